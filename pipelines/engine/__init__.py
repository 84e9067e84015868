"""What every task shares: training with Model Garden (train.py)."""

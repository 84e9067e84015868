"""Detection: SSD MobileNet V2 FPNLite built, trained and exported with Model Garden."""

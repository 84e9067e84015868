"""Back to the annotator: a trained model drafts labels for coco-annotator, the person corrects them.

`drafts.py` the COCO shape of a model's drafts (what `/annotate` answers and `make prelabel` writes) and
the rule that tells a draft from a reviewed annotation; `prelabel.py` `make prelabel` (a dataset folder's
images -> a COCO file coco-annotator imports); `client.py` its upload through coco-annotator's API.
"""

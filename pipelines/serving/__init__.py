"""Serving: the BentoML HTTP services of an export (`bentoml serve pipelines.serving.service:Service`).

images.py decodes and checks request images; service.py holds the Detector and Segmenter services.
"""

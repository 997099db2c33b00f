"""Faces in photos: MTCNN detection (boxes, scores, 5 landmarks) and alignment to the crop
convention of a dataset. Needs torch and torchvision only (and mpafer's download helper when
the detector's weights are not given as a folder).

    detector = MTCNN(weights_dir=None).to(device)      # None: download into weights/ once
    for crop, box, landmarks, score in detect_and_align(photo, detector, "rafdb"):
        ...
"""
from .align import (
    CONVENTIONS,
    DATASET_CONVENTIONS,
    AlignedFace,
    Convention,
    align_face,
    detect_and_align,
    get_convention,
    similarity_transform,
)
from .mtcnn import MTCNN, Detections

__all__ = ["MTCNN", "Detections", "CONVENTIONS", "DATASET_CONVENTIONS", "AlignedFace",
           "Convention", "align_face", "detect_and_align", "get_convention",
           "similarity_transform"]

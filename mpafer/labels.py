"""The canonical facial expression classes, in one place.

Every dataset reader maps its own label order onto these names, and predictions are reported
by name. This module imports nothing, so any module (or a copy of one) can use it.
"""

# The 8-class order (FERPlus's and AffectNet-8's set, in fer2013new.csv's column order).
CANONICAL_CLASSES = ("neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear",
                     "contempt")
# The 7 basic expressions: 7-class sets (RAF-DB, AffectNet-7) drop contempt.
BASIC_CLASSES = CANONICAL_CLASSES[:7]

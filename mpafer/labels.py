"""The canonical facial expression classes, onto which every dataset reader maps its labels.
This module imports nothing, so any module (or a copy of one) can use it."""

# The 8-class order (FERPlus's and AffectNet-8's set, in fer2013new.csv's column order).
CANONICAL_CLASSES = ("neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear",
                     "contempt")
# The 7 basic expressions: 7-class sets (RAF-DB, AffectNet-7) drop contempt.
BASIC_CLASSES = CANONICAL_CLASSES[:7]
# The usual other names of the canonical classes (the widely shared FER2013 folders' names,
# adjectives), in any case.
SYNONYMS = {"angry": "anger", "happy": "happiness", "sad": "sadness", "surprised": "surprise",
            "fearful": "fear", "disgusted": "disgust", "contemptuous": "contempt"}


def canonical_name(name: str) -> str:
    """The canonical class `name` stands for ('Happy' -> 'happiness', 'angry' -> 'anger');
    any other name as given, stripped."""
    key = name.strip().lower()
    key = SYNONYMS.get(key, key)
    return key if key in CANONICAL_CLASSES else name.strip()


def same_class(a: str, b: str) -> bool:
    """Whether two class names mean the same class, in any case."""
    return canonical_name(a).lower() == canonical_name(b).lower()


def match_classes(names, classnames) -> tuple:
    """Each of `names` as `classnames` spells it (`same_class`) -> (the matched names, in the
    order of `names`; those that match none)."""
    matched, unknown = [], []
    for name in names:
        found = [c for c in classnames if same_class(name, c)]
        (matched if found else unknown).append(found[0] if found else name)
    return matched, unknown

"""mpafer: CLIP prompt learning for facial expression recognition (MPA-FER, Exp-CLIP)."""
__version__ = "0.1.0"

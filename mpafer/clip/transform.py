"""CLIP's image preprocessing (the `preprocess` that `mpafer.clip.load` returns)."""
from torchvision import transforms as T

# Per-channel statistics of OpenAI's CLIP training images (RGB, on [0, 1] pixels).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _to_rgb(image):
    return image.convert("RGB")


def clip_preprocess(resolution: int) -> T.Compose:
    """Bicubic resize of the short side, centre crop, RGB, ToTensor, CLIP normalisation."""
    return T.Compose([
        T.Resize(resolution, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(resolution),
        _to_rgb,
        T.ToTensor(),
        T.Normalize(CLIP_MEAN, CLIP_STD),
    ])

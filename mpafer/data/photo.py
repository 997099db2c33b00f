"""Single photos for prediction: a picture far from square, or much larger than the model's
input, is probably no face crop, so it is centre-cropped to a square (no transform squashes it)."""
from typing import Optional, Tuple

from PIL import Image

MAX_ASPECT = 1.3  # longer side / shorter side
MAX_SIZE_FACTOR = 4  # longer side / the model's input resolution


def face_input(image: Image.Image, resolution: int) -> Tuple[Image.Image, Optional[str]]:
    """-> (the image, centre-cropped unless it looks like a face crop; a note, or None)."""
    width, height = image.size
    aspect = max(width, height) / max(min(width, height), 1)
    large = max(width, height) > MAX_SIZE_FACTOR * resolution
    if aspect <= MAX_ASPECT and not large:
        return image, None
    reasons = []
    if aspect > MAX_ASPECT:
        reasons.append(f"aspect ratio {aspect:.2f} > {MAX_ASPECT}")
    if large:
        reasons.append(f"larger than {MAX_SIZE_FACTOR}x the model's {resolution}px input")
    side = min(width, height)
    note = (f"{width}x{height} picture ({'; '.join(reasons)}): expected a cropped face; using "
            f"its centre {side}x{side} square. Crop the face first for a meaningful prediction.")
    left, top = (width - side) // 2, (height - side) // 2
    return image.crop((left, top, left + side, top + side)), note

"""MTCNN face detection (Zhang et al., 2016) in PyTorch: every face in a picture, with a box,
a score and 5 landmarks.

Three networks run in a cascade. P-Net slides over an image pyramid and proposes windows;
R-Net rescores and refines them on 24x24 crops; O-Net does so again on 48x48 crops and places
the landmarks. Each network runs once per stage on all its candidates (of all images of a
batch), and non-maximum suppression uses `torchvision.ops`. The networks' parameter names are
those of facenet-pytorch's converted weights, which load as they are (see `weights.py`).

    detector = MTCNN().to(device)            # downloads the weights on first use
    faces = detector.detect(pil_image)       # Detections(boxes [N, 4], scores [N],
                                             #            landmarks [N, 5, 2])

Coordinates are pixels of the input picture (x right, y down). The landmarks are, in order, the
left eye, right eye, nose, left and right mouth corner, "left" meaning the image's left.
"""
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.ops import batched_nms
from torchvision.transforms.functional import pil_to_tensor

from .weights import load_state_dict_into, weight_paths

# The published cascade's settings.
MIN_FACE = 20  # smallest face searched for, in pixels
THRESHOLDS = (0.6, 0.7, 0.7)  # face probability each stage requires
PYRAMID_FACTOR = 0.709  # ratio of successive pyramid scales (about 1/sqrt(2))
WINDOW = 12  # P-Net's window, in pixels of a pyramid level
STRIDE = 2  # P-Net's stride over a pyramid level
NMS_WITHIN_SCALE, NMS_ACROSS_SCALES, NMS_REFINED, NMS_FINAL = 0.5, 0.7, 0.7, 0.7


class PNet(nn.Module):
    """Proposal network: fully convolutional, a face probability and box offsets for each
    12x12 window of its input at stride 2."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 10, 3), nn.PReLU(10)
        self.conv2, self.prelu2 = nn.Conv2d(10, 16, 3), nn.PReLU(16)
        self.conv3, self.prelu3 = nn.Conv2d(16, 32, 3), nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, 1)  # not-face / face logits
        self.conv4_2 = nn.Conv2d(32, 4, 1)  # box offsets

    def forward(self, x):
        """x [B, 3, H, W] -> (offsets [B, 4, h, w], face probability [B, h, w])."""
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 2, 2, ceil_mode=True)
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return self.conv4_2(x), self.conv4_1(x).softmax(dim=1)[:, 1]


def _caffe_flatten(x: torch.Tensor) -> torch.Tensor:
    # The converted dense layers read a feature map in (width, height, channel) order.
    return x.permute(0, 3, 2, 1).flatten(1)  # [N, C, H, W] -> [N, W * H * C]


class RNet(nn.Module):
    """Refinement network: rescores a 24x24 crop and refines its box."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
        self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
        self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
        self.dense4, self.prelu4 = nn.Linear(64 * 3 * 3, 128), nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)  # not-face / face logits
        self.dense5_2 = nn.Linear(128, 4)  # box offsets

    def forward(self, x):
        """x [N, 3, 24, 24] -> (offsets [N, 4], face probability [N])."""
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2, ceil_mode=True)
        x = self.prelu3(self.conv3(x))  # [N, 64, 3, 3]
        x = self.prelu4(self.dense4(_caffe_flatten(x)))
        return self.dense5_2(x), self.dense5_1(x).softmax(dim=1)[:, 1]


class ONet(nn.Module):
    """Output network: rescores a 48x48 crop, refines its box and places 5 landmarks."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
        self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
        self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
        self.dense5, self.prelu5 = nn.Linear(128 * 3 * 3, 256), nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)  # not-face / face logits
        self.dense6_2 = nn.Linear(256, 4)  # box offsets
        self.dense6_3 = nn.Linear(256, 10)  # landmarks: 5 x, then 5 y, as fractions of the box

    def forward(self, x):
        """x [N, 3, 48, 48] -> (offsets [N, 4], landmarks [N, 10], face probability [N])."""
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu3(self.conv3(x)), 2, 2, ceil_mode=True)
        x = self.prelu4(self.conv4(x))  # [N, 128, 3, 3]
        x = self.prelu5(self.dense5(_caffe_flatten(x)))
        return self.dense6_2(x), self.dense6_3(x), self.dense6_1(x).softmax(dim=1)[:, 1]


class Detections(NamedTuple):
    """The faces found in one picture, best score first (tensors on the CPU)."""
    boxes: torch.Tensor  # [N, 4] x0, y0, x1, y1
    scores: torch.Tensor  # [N] face probability from O-Net
    landmarks: torch.Tensor  # [N, 5, 2] (x, y): left eye, right eye, nose, mouth corners


class _Candidates(NamedTuple):
    """Windows still in the running: which image each is in, its box and its score."""
    image_index: torch.Tensor  # [K]
    boxes: torch.Tensor  # [K, 4]
    scores: torch.Tensor  # [K]

    def select(self, keep):
        return _Candidates(self.image_index[keep], self.boxes[keep], self.scores[keep])


def _normalise(pixels: torch.Tensor) -> torch.Tensor:
    return (pixels - 127.5) * 0.0078125  # [0, 255] -> about [-1, 1], as the networks learned


def _resize_area(pixels: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    # Area averaging: what the weights were converted and checked with.
    return F.interpolate(pixels, size=size, mode="area")


def _crops(images: torch.Tensor, image_index: torch.Tensor, ranges: torch.Tensor,
           size: int) -> torch.Tensor:
    """Each range [x0, y0, x1, y1) of its image, resized to size x size: [K, 3, size, size]."""
    out = images.new_empty((len(ranges), images.shape[1], size, size))
    for k, (i, (x0, y0, x1, y1)) in enumerate(zip(image_index.tolist(), ranges.tolist())):
        out[k] = _resize_area(images[i:i + 1, :, y0:y1, x0:x1], (size, size))[0]
    return out


def pyramid_scales(height: int, width: int, min_face: float,
                   factor: float = PYRAMID_FACTOR) -> List[float]:
    """Scales at which a face of `min_face` pixels, then ever larger ones, fill P-Net's window,
    down to the scale where the shorter side is one window."""
    scale = WINDOW / min_face
    shorter = min(height, width) * scale
    scales = []
    while shorter >= WINDOW:
        scales.append(scale)
        scale *= factor
        shorter *= factor
    return scales


def _regress(boxes: torch.Tensor, offsets: torch.Tensor, plus_one: bool) -> torch.Tensor:
    """Move each box edge by its offset times the box's size. (P-Net's offsets were trained
    with sizes x1 - x0, the later stages' with x1 - x0 + 1.)"""
    extra = 1.0 if plus_one else 0.0
    width = boxes[:, 2] - boxes[:, 0] + extra
    height = boxes[:, 3] - boxes[:, 1] + extra
    return boxes + offsets * torch.stack([width, height, width, height], dim=1)


def _square(boxes: torch.Tensor) -> torch.Tensor:
    """The square with the box's centre and its longer side."""
    width, height = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    side = torch.maximum(width, height)
    x0 = boxes[:, 0] + width * 0.5 - side * 0.5
    y0 = boxes[:, 1] + height * 0.5 - side * 0.5
    return torch.stack([x0, y0, x0 + side, y0 + side], dim=1)


def _pixel_ranges(boxes: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """[K, 4] integer x0, y0, x1, y1 (end exclusive) of the part of each box inside the image.

    The cascade's boxes use 1-based inclusive corners: a box's pixels run from column
    trunc(x0) - 1 to trunc(x1) - 1. The part outside the image is left out, not padded.
    """
    b = boxes.trunc().long()
    x0, y0 = b[:, 0].clamp(min=1) - 1, b[:, 1].clamp(min=1) - 1
    x1, y1 = b[:, 2].clamp(max=width), b[:, 3].clamp(max=height)
    return torch.stack([x0, y0, x1, y1], dim=1)


def _nms_min(boxes: torch.Tensor, scores: torch.Tensor, image_index: torch.Tensor,
             threshold: float) -> torch.Tensor:
    """Greedy suppression per image where overlap = intersection / the smaller box's area
    (1-based inclusive corners), as the cascade's last step uses: it also removes a small box
    inside a larger, better one. -> indices kept, best first."""
    if len(boxes) == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    # Shift each image's boxes apart so that boxes of different images never overlap.
    shifted = boxes + (image_index.to(boxes) * (boxes.max() + 1))[:, None]
    order = scores.argsort(descending=True)
    b = shifted[order]
    area = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)
    top_left = torch.maximum(b[:, None, :2], b[None, :, :2])  # [K, K, 2]
    bottom_right = torch.minimum(b[:, None, 2:], b[None, :, 2:])  # [K, K, 2]
    sides = (bottom_right - top_left + 1).clamp(min=0)
    overlap = sides[..., 0] * sides[..., 1] / torch.minimum(area[:, None], area[None, :])
    suppresses = (overlap > threshold).cpu().tolist()
    removed, keep = [False] * len(b), []
    for k in range(len(b)):
        if not removed[k]:
            keep.append(k)
            removed = [r or s for r, s in zip(removed, suppresses[k])]
    return order[torch.tensor(keep, device=order.device)]


class MTCNN(nn.Module):
    """The three-stage cascade. `weights_dir`: a folder holding pnet.pt, rnet.pt and onet.pt
    (nothing is downloaded); None downloads them on first use into `download_root` (default:
    the weights folder, see `weights.py`); `pretrained=False` leaves the networks randomly
    initialised."""

    def __init__(self, weights_dir: Optional[str] = None, min_face: float = MIN_FACE,
                 thresholds: Sequence[float] = THRESHOLDS, factor: float = PYRAMID_FACTOR,
                 pretrained: bool = True, download_root: Optional[str] = None):
        super().__init__()
        self.pnet, self.rnet, self.onet = PNet(), RNet(), ONet()
        self.min_face, self.thresholds, self.factor = min_face, tuple(thresholds), factor
        if pretrained:
            paths = weight_paths(weights_dir, download_root)
            for name, network in (("pnet.pt", self.pnet), ("rnet.pt", self.rnet),
                                  ("onet.pt", self.onet)):
                load_state_dict_into(network, paths[name])
        self.eval()

    @property
    def device(self) -> torch.device:
        return self.pnet.conv1.weight.device

    @torch.no_grad()
    def detect(self, image: Union[Image.Image, torch.Tensor], max_side: Optional[int] = None,
               min_face: Optional[float] = None) -> Detections:
        """Faces in one picture: a PIL image or a [3, H, W] tensor of 0..255 values.

        `max_side`: a picture whose longer side is above it is searched in a copy scaled down to
        that size (a large photo costs no more than that); boxes and landmarks still come back
        in the picture's own pixels. Faces under 12 pixels in that copy cannot be found.
        `min_face` (pixels of the picture) overrides the detector's.
        """
        pixels = _as_pixels(image).to(self.device)
        height, width = pixels.shape[-2:]
        min_face = self.min_face if min_face is None else min_face
        scale = 1.0
        if max_side is not None and max(height, width) > max_side:
            scale = max_side / max(height, width)
            size = (max(1, round(height * scale)), max(1, round(width * scale)))
            pixels = _resize_area(pixels[None].float(), size)[0]
            scale_x, scale_y = size[1] / width, size[0] / height
            min_face = max(min_face * scale, WINDOW)
        found = self.detect_batch(pixels[None], min_face)[0]
        if scale == 1.0:
            return found
        to_original = torch.tensor([scale_x, scale_y])
        return Detections(found.boxes / to_original.repeat(2), found.scores,
                          found.landmarks / to_original)

    @torch.no_grad()
    def detect_batch(self, images: torch.Tensor, min_face: Optional[float] = None
                     ) -> List[Detections]:
        """Faces in each of a batch of same-sized pictures, [B, 3, H, W] of 0..255 values."""
        images = images.to(self.device, torch.float32)
        min_face = self.min_face if min_face is None else min_face
        candidates = self._propose(images, min_face)
        candidates = self._refine(images, candidates)
        candidates, landmarks = self._output(images, candidates)
        return [Detections(candidates.boxes[candidates.image_index == i].cpu(),
                           candidates.scores[candidates.image_index == i].cpu(),
                           landmarks[candidates.image_index == i].cpu())
                for i in range(len(images))]

    def _propose(self, images: torch.Tensor, min_face: float) -> _Candidates:
        """Stage 1: P-Net over the pyramid; suppression within each scale, then across scales;
        boxes refined and made square."""
        height, width = images.shape[-2:]
        per_scale, offsets = [], []
        for scale in pyramid_scales(height, width, min_face, self.factor):
            # Sizes rounded up as the weights' original pipeline did (int(side * scale + 1)).
            level = _resize_area(images, (int(height * scale + 1), int(width * scale + 1)))
            # Channels-last runs the networks' convolutions and pooling faster on CPUs.
            level = level.contiguous(memory_format=torch.channels_last)
            level_offsets, probability = self.pnet(_normalise(level))
            image_index, row, col = (probability >= self.thresholds[0]).nonzero(as_tuple=True)
            cells = torch.stack([col, row], dim=1).float()  # [K, 2] x, y of each window
            top_left = ((STRIDE * cells + 1) / scale).floor()
            bottom_right = ((STRIDE * cells + WINDOW) / scale).floor()
            found = _Candidates(image_index, torch.cat([top_left, bottom_right], dim=1),
                                probability[image_index, row, col])
            keep = batched_nms(found.boxes, found.scores, found.image_index, NMS_WITHIN_SCALE)
            per_scale.append(found.select(keep))
            offsets.append(level_offsets.permute(0, 2, 3, 1)[image_index, row, col][keep])
        if not per_scale:
            return _empty(self.device)
        candidates = _Candidates(*(torch.cat(parts) for parts in zip(*per_scale)))
        offsets = torch.cat(offsets)  # [K, 4]
        keep = batched_nms(candidates.boxes, candidates.scores, candidates.image_index,
                           NMS_ACROSS_SCALES)
        candidates = candidates.select(keep)
        boxes = _square(_regress(candidates.boxes, offsets[keep], plus_one=False))
        return candidates._replace(boxes=boxes)

    @staticmethod
    def _inputs(images, candidates, size):
        """The crops of the candidates whose box reaches into the image, resized to size x size
        and normalised, and which candidates those are."""
        ranges = _pixel_ranges(candidates.boxes, images.shape[-1], images.shape[-2])
        inside = ((ranges[:, 2] > ranges[:, 0]) & (ranges[:, 3] > ranges[:, 1])).nonzero()[:, 0]
        candidates = candidates.select(inside)
        crops = _crops(images, candidates.image_index, ranges[inside], size)
        return _normalise(crops).contiguous(memory_format=torch.channels_last), candidates

    def _refine(self, images: torch.Tensor, candidates: _Candidates) -> _Candidates:
        """Stage 2: R-Net rescores 24x24 crops; suppression; boxes refined and made square."""
        if len(candidates.boxes) == 0:
            return candidates
        crops, candidates = self._inputs(images, candidates, 24)
        offsets, probability = self.rnet(crops)
        passed = probability > self.thresholds[1]
        candidates = _Candidates(candidates.image_index[passed], candidates.boxes[passed],
                                 probability[passed])
        offsets = offsets[passed]
        keep = batched_nms(candidates.boxes, candidates.scores, candidates.image_index,
                           NMS_REFINED)
        candidates = candidates.select(keep)
        boxes = _square(_regress(candidates.boxes, offsets[keep], plus_one=True))
        return candidates._replace(boxes=boxes)

    def _output(self, images: torch.Tensor, candidates: _Candidates):
        """Stage 3: O-Net rescores 48x48 crops and places landmarks; boxes refined; overlaps
        suppressed by the smaller box's area. -> (faces best first, landmarks [N, 5, 2])."""
        if len(candidates.boxes) == 0:
            return candidates, torch.zeros(0, 5, 2, device=self.device)
        crops, candidates = self._inputs(images, candidates, 48)
        offsets, points, probability = self.onet(crops)
        passed = probability > self.thresholds[2]
        boxes, points, offsets = candidates.boxes[passed], points[passed], offsets[passed]
        # Landmarks are fractions of the (1-based, inclusive) box O-Net saw.
        size = (boxes[:, 2:] - boxes[:, :2] + 1)[:, None, :]  # [N, 1, 2]
        landmarks = points.reshape(-1, 2, 5).transpose(1, 2) * size + boxes[:, None, :2] - 1
        candidates = _Candidates(candidates.image_index[passed],
                                 _regress(boxes, offsets, plus_one=True), probability[passed])
        keep = _nms_min(candidates.boxes, candidates.scores, candidates.image_index, NMS_FINAL)
        return candidates.select(keep), landmarks[keep]


def _empty(device) -> _Candidates:
    return _Candidates(torch.zeros(0, dtype=torch.long, device=device),
                       torch.zeros(0, 4, device=device), torch.zeros(0, device=device))


def _as_pixels(image: Union[Image.Image, torch.Tensor]) -> torch.Tensor:
    """A PIL image (any mode) or a [3, H, W] tensor -> [3, H, W] tensor of 0..255 values."""
    if isinstance(image, Image.Image):
        return pil_to_tensor(image.convert("RGB"))
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a PIL image or a [3, H, W] tensor, got shape "
                         f"{tuple(image.shape)}")
    return image

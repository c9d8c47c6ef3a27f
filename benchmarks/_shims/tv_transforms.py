"""PIL/torch versions of the torchvision transforms diffusers' LoRA example uses (see run_example.py for why)."""

import enum
import random

import numpy as np
import torch
from PIL import Image


class InterpolationMode(enum.Enum):
    NEAREST = Image.NEAREST
    BILINEAR = Image.BILINEAR
    BICUBIC = Image.BICUBIC
    LANCZOS = Image.LANCZOS


class Compose:
    def __init__(self, ts):
        self.ts = ts

    def __call__(self, x):
        for t in self.ts:
            x = t(x)
        return x


class Resize:
    def __init__(self, size, interpolation=InterpolationMode.BILINEAR):
        self.size, self.interp = size, (interpolation or InterpolationMode.BILINEAR).value

    def __call__(self, im):
        w, h = im.size
        s = self.size / min(w, h)
        return im.resize((max(1, round(w * s)), max(1, round(h * s))), self.interp)


class CenterCrop:
    def __init__(self, size):
        self.size = size

    def __call__(self, im):
        w, h = im.size
        left, top = (w - self.size) // 2, (h - self.size) // 2
        return im.crop((left, top, left + self.size, top + self.size))


class RandomCrop(CenterCrop):
    def __call__(self, im):
        w, h = im.size
        left, top = random.randint(0, w - self.size), random.randint(0, h - self.size)
        return im.crop((left, top, left + self.size, top + self.size))


class RandomHorizontalFlip:
    def __call__(self, im):
        return im.transpose(Image.FLIP_LEFT_RIGHT) if random.random() < 0.5 else im


class Lambda:
    def __init__(self, fn):
        self.fn = fn

    def __call__(self, x):
        return self.fn(x)


class ToTensor:
    def __call__(self, im):
        return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


class Normalize:
    def __init__(self, mean, std):
        self.mean, self.std = mean[0], std[0]

    def __call__(self, x):
        return (x - self.mean) / self.std

"""`python run_example.py SCRIPT ARGS…`: run diffusers' LoRA example with a PIL stand-in for `torchvision.transforms`.

For benchmarks/vs_diffusers_lora.py only. Why: on this CPU machine the only torchvision wheel available offline
(0.28.0, a CUDA build) fails to load its operators against the CPU torch 2.13.0 ("operator torchvision::nms does
not exist"), so the example cannot import `torchvision.transforms`. accelerate, datasets, transformers, peft and
diffusers are imported first (they then see no torchvision, as in our own runs); only after that is `tv_transforms`
registered as
`torchvision.transforms`, and the script runs as __main__. It implements Resize (shorter side), CenterCrop,
RandomCrop, RandomHorizontalFlip, Lambda, ToTensor, Normalize and Compose with PIL + torch; the training step the
benchmark times (UNet forward/backward) does not touch it.
"""

import runpy
import sys
import types
from pathlib import Path

import accelerate  # noqa: F401  (import before the stand-in exists: no library takes it for real torchvision)
import datasets  # noqa: F401
import diffusers  # noqa: F401
import peft  # noqa: F401
import transformers  # noqa: F401

sys.path.insert(0, str(Path(__file__).parent))
import tv_transforms  # noqa: E402

tv = types.ModuleType("torchvision")
tv.transforms = tv_transforms
sys.modules["torchvision"], sys.modules["torchvision.transforms"] = tv, tv_transforms

if __name__ == "__main__":
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    runpy.run_path(script, run_name="__main__")

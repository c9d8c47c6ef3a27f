"""Fine-tune Stable Diffusion with memorization mitigations.

    accelerate launch --config_file accelerate_configs/cpu_1proc.yaml train.py recipe=tiny [key.sub=value ...]
    accelerate launch --config_file accelerate_configs/cpu_2proc.yaml train.py recipe=tiny train.max_steps=20
"""

import sys

from guard_train.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main(sys.argv[1:]))

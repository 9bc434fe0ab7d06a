"""idefics2_mini: a from-scratch, pure-PyTorch Idefics2-8B.

    import idefics2_mini as im
    model = im.Idefics2.from_pretrained(path, dtype=torch.float32, device="cpu")
    processor = im.Idefics2Processor.from_pretrained(path)
"""

from .backends import apply_backends, compile_decode
from .cache import KVCache
from .config import Idefics2Config, PerceiverConfig, TextConfig, VisionConfig
from .loading import PREFIX_TABLE, CheckpointError, save_checkpoint
from .model import Idefics2, Idefics2Output, InputError
from .packing import PackedImages
from .processor import Idefics2Processor

load_model = Idefics2.from_pretrained

__all__ = [
    "PREFIX_TABLE",
    "CheckpointError",
    "Idefics2",
    "Idefics2Config",
    "Idefics2Output",
    "Idefics2Processor",
    "PackedImages",
    "InputError",
    "KVCache",
    "PerceiverConfig",
    "TextConfig",
    "VisionConfig",
    "apply_backends",
    "compile_decode",
    "load_model",
    "save_checkpoint",
]

"""Models: cutting a Hugging Face model into a client and a server half, and loading models offline."""

from .architectures import ARCHITECTURES, Architecture
from .halves import TASK_CAUSAL_LM, TASK_ENCODER, TASK_SEQUENCE_CLASSIFICATION, ClientHalf, ServerHalf
from .registry import MODEL_NAMES, MissingModelPackageError, ModelSource, load_model, resolve_model
from .split import split

__all__ = [
    "split",
    "ARCHITECTURES",
    "Architecture",
    "ClientHalf",
    "ServerHalf",
    "load_model",
    "resolve_model",
    "ModelSource",
    "MODEL_NAMES",
    "MissingModelPackageError",
    "TASK_CAUSAL_LM",
    "TASK_SEQUENCE_CLASSIFICATION",
    "TASK_ENCODER",
]

"""GPT-2 on TensorFlow 2: OpenAI's checkpoints as they are, GPT-2's own tokenizer, fast sampling.

    import gpt2
    model = gpt2.load("124M")
    print(model.generate("The river", length=40, seed=1)[0])

TensorFlow starts when a model is loaded, not on `import gpt2`: the commands check their flags and
download models without it, and an int8 model whose programs are stored runs without it.
"""
from .errors import GPT2Error

__all__ = ["GPT2", "GPT2Error", "finetune", "load"]


def __getattr__(name):
    if name in ("GPT2", "load"):
        from . import api
        return getattr(api, name)
    if name == "finetune":
        from .finetuning import finetune
        return finetune
    raise AttributeError(f"module 'gpt2' has no attribute {name!r}")

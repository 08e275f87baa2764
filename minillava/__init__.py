"""minillava: LLaVA (v1, 1.5 and 1.6) from scratch in plain PyTorch: the model, its tokenizer, templates, images, data
and sampling. It imports `minillava.kernels` and nothing above it: checkpoint files are `minillava.weights`'.

    import minillava, minillava.weights
    model = minillava.weights.load_llava(path, dtype=torch.float32, device="cpu")  # any official layout
    tok = minillava.Tokenizer(path)                                 # its tokenizer.model + tokenizer_config.json
    prompt = minillava.build_prompt([("human", "<image>\nWhat is this?")], "vicuna_v1")
    input_ids = torch.tensor([minillava.tokenize_with_images(prompt, tok, model.config.image_token_id)])
    pixels = minillava.preprocess_image("photo.jpg", size=model.config.vision.image_size)  # (3, S, S)
    logits = model(input_ids, pixel_values=pixels[None])  # ONE image_token_id per image in input_ids

One name for everything: the repository's kernels/, weights/ and scripts (train.py, generate.py, eval.py, serve.py,
demo.py, quantize.py, and demo.py's synthetic.py) are `minillava.kernels`, `minillava.weights`, `minillava.train`,
`minillava.synthetic`, ... In a checkout they stay where they are and the root is one more folder this package's
modules are found in (below); an installed copy has them inside (setup.py).
"""
import os as _os

_ROOT = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(__path__[0], "kernels")) and _os.path.isfile(_os.path.join(_ROOT, "setup.py")):
    __path__.append(_ROOT)  # a checkout: minillava.kernels is <root>/kernels, minillava.train is <root>/train.py

# The API, imported when first used: `import minillava.cli` or `minillava.templates` alone stays free of torch (a
# script's --help answers at once).
_API = {"LlavaConfig": "config", "TextConfig": "config", "VisionConfig": "config", "from_hf_config": "config",
        "get_preset": "config", "to_hf_config": "config", "Llava": "llava", "build_prompt": "templates",
        "Tokenizer": "tokenizer", "tokenize_with_images": "tokenizer"}


def __getattr__(name):
    if name not in _API:
        raise AttributeError(f"module 'minillava' has no attribute {name!r}")
    import importlib
    return getattr(importlib.import_module(f"minillava.{_API[name]}"), name)


def preprocess_image(image, size: int = 336, pad: bool = True):
    """An image (path, PIL image or HWC uint8 array) -> normalised (3, size, size) float32 tensor."""
    from minillava.image import preprocess_image as _preprocess
    return _preprocess(image, size=size, pad=pad)

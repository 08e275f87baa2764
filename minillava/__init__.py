"""minillava: LLaVA (v1, 1.5 and 1.6) from scratch in plain PyTorch: the model, its tokenizer, templates, images, data
and sampling. It imports `kernels` and nothing above it: checkpoint files are the `weights` package's.

    import minillava, weights
    model = weights.load_llava(path, vision_path=None, dtype=torch.float32, device="cpu")  # any official layout
    tok = minillava.Tokenizer(path)                                 # its tokenizer.model + tokenizer_config.json
    prompt = minillava.build_prompt([("human", "<image>\nWhat is this?")], "vicuna_v1")
    input_ids = torch.tensor([minillava.tokenize_with_images(prompt, tok, model.config.image_token_id)])
    pixels = minillava.preprocess_image("photo.jpg", size=model.config.vision.image_size)  # (3, S, S)
    logits = model(input_ids, pixel_values=pixels[None])  # ONE image_token_id per image in input_ids
"""
from minillava.config import LlavaConfig, TextConfig, VisionConfig, from_hf_config, get_preset, to_hf_config
from minillava.llava import Llava
from minillava.templates import build_prompt
from minillava.tokenizer import Tokenizer, tokenize_with_images


def preprocess_image(image, size: int = 336, pad: bool = True):
    """An image (path, PIL image or HWC uint8 array) -> normalised (3, size, size) float32 tensor."""
    from minillava.image import preprocess_image as _preprocess
    return _preprocess(image, size=size, pad=pad)

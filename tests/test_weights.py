"""weights/: every official layout loads to the same model, sharding, dtypes, zero-copy, saving, bad input."""
import dataclasses
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from minillava.config import IMAGE_TOKEN_INDEX, get_preset
from minillava.kernels.linear import DecodeLinear
from minillava.tokenizer import Tokenizer
from minillava.weights import (CheckpointError, load_llava, random_llava, save_llava, save_projector, write_layout,
                     write_random_checkpoint)
from minillava.weights import keymaps
from minillava.weights.load import ALIGN, read_safetensors_header
from minillava.weights import save as save_module
from tests.spm_util import train_tiny_spm

TINY = get_preset("tiny")
from minillava.weights.random_checkpoint import LAYOUTS  # noqa: E402  (every layout the loader claims)


def load(paths, **kwargs):
    return load_llava(paths["model"], vision_path=paths.get("vision"), projector_path=paths.get("projector"),
                      **kwargs)


def batch(image_token_id, seed=0):
    """Two sequences, right-padded: the first holds 2 images, the second 1."""
    img = image_token_id
    ids = torch.tensor([[1, 5, img, 6, 7, img, 8], [1, 9, img, 10, 0, 0, 0]])
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    pix = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    return ids, pix, mask


@torch.no_grad()
def logits(model, image_token_id=None):
    ids, pix, mask = batch(model.config.image_token_id if image_token_id is None else image_token_id)
    return model(ids, pix, mask)


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def ref():
    return random_llava(TINY, seed=0)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, ref):
    root = tmp_path_factory.mktemp("ckpts")
    return {layout: write_layout(ref, root / layout.replace("'", "p"), layout) for layout in LAYOUTS}


def copy_ckpt(paths, dst: Path) -> dict:
    """A private copy of a checkpoint (tests below damage it)."""
    out = {}
    dst.mkdir(parents=True, exist_ok=True)
    for k, p in paths.items():
        out[k] = dst / p.name
        (shutil.copytree if p.is_dir() else shutil.copyfile)(p, out[k])
    return out


def edit_tensors(file: Path, edit):
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def edit_json(file: Path, edit):
    d = json.loads(file.read_text())
    edit(d)
    file.write_text(json.dumps(d))


# ----------------------------------------------------------------------------------------------------------
# Every layout, sharding, dtypes

@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_loads_the_same_model(ckpts, ref, layout):
    model = load(ckpts[layout])
    expected_image_id = TINY.image_token_id if layout.startswith("A") else IMAGE_TOKEN_INDEX
    assert model.config.image_token_id == expected_image_id
    assert model.config.vision == TINY.vision and model.config.text == TINY.text
    assert_same_state(model, ref)
    # Bitwise-equal weights; the logits may still differ in the last bit where BLAS picks its path by the
    # alignment of the data (a file written by safetensors' save_file maps its tensors 8-byte aligned; ours, and
    # fresh tensors, are 64-byte aligned: weights/save.py).
    torch.testing.assert_close(logits(model), logits(ref, TINY.image_token_id), atol=1e-6, rtol=1e-6)


def test_load_llava_casts_to_the_dtype_asked(ckpts, ref):
    paths = ckpts["C"]
    model = load_llava(paths["model"], vision_path=paths["vision"], projector_path=paths["projector"],
                       dtype=torch.bfloat16)
    assert model.config.image_token_id == IMAGE_TOKEN_INDEX
    assert torch.equal(model.language_model.lm_head.weight, ref.language_model.lm_head.weight.bfloat16())


def test_layout_b_with_its_own_tower(tmp_path, ckpts, ref):
    """Self-trained original checkpoints also save the (frozen) tower as model.vision_tower.vision_tower.*:
    then those tensors are the model's, and the CLIP dir only gives the config."""
    paths = copy_ckpt(ckpts["B"], tmp_path)
    clip = load_file(paths["vision"] / "model.safetensors")
    edit_tensors(paths["model"] / "model.safetensors", lambda t: t.update(
        {"model.vision_tower.vision_tower." + k: v.clone() for k, v in clip.items() if k.startswith("vision_model.")}))
    (paths["vision"] / "model.safetensors").unlink()  # not read
    model = load(paths)
    assert_same_state(model, ref)


def test_random_checkpoint_is_reproducible_and_official_shaped(tmp_path, ref):
    paths = write_random_checkpoint(tmp_path / "c", TINY, "C", seed=0)
    assert_same_state(load(paths), ref)
    clip = load_file(paths["vision"] / "model.safetensors")
    for key in ("logit_scale", "visual_projection.weight", "text_projection.weight",
                "text_model.embeddings.position_ids", "vision_model.embeddings.position_ids",
                "vision_model.embeddings.class_embedding", "vision_model.pre_layrnorm.weight"):
        assert key in clip, key
    llama = load_file(paths["model"] / "model.safetensors")
    assert "model.layers.1.self_attn.rotary_emb.inv_freq" in llama and "lm_head.weight" in llama
    assert set(load_file(paths["projector"])) == {f"model.mm_projector.{i}.{p}" for i in (0, 2)
                                                  for p in ("weight", "bias")}


@pytest.mark.parametrize("layout", ["A", "B", "C"])
def test_sharded_equals_single_file(tmp_path, ckpts, ref, layout):
    paths = write_layout(ref, tmp_path / "s", layout, max_shard_bytes=40_000)
    index = json.loads((paths["model"] / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and not (paths["model"] / "model.safetensors").exists()
    assert_same_state(load(paths), load(ckpts[layout]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dtype_choice(ckpts, ref, tmp_path, dtype):
    model = load(ckpts["A"], dtype=dtype)  # stored fp32, cast while loading
    for k, v in model.state_dict().items():
        assert v.dtype == dtype and torch.equal(v, ref.state_dict()[k].to(dtype)), k
    stored = write_random_checkpoint(tmp_path / "b", TINY, "B", dtype=dtype)  # stored in dtype, loaded fp32
    model = load(stored, dtype=torch.float32)
    for k, v in model.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, ref.state_dict()[k].to(dtype).float()), k
    with pytest.raises(ValueError, match="dtype torch.float64 not supported"):
        load(ckpts["A"], dtype=torch.float64)


def _mapped_ranges(file: Path):
    ranges = []
    with open("/proc/self/maps") as f:
        for line in f:
            if line.rstrip().endswith(str(file)):
                lo, hi = line.split()[0].split("-")
                ranges.append((int(lo, 16), int(hi, 16)))
    return ranges


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_same_dtype_load_is_zero_copy_memory_mapped(ckpts):
    """Every parameter's data lies inside the memory-mapped checkpoint file, ALIGN-aligned (our files put every
    weight there): no copy was made."""
    model = load(ckpts["B"])
    files = [(ckpts["B"]["model"] / "model.safetensors").resolve(),
             (ckpts["B"]["vision"] / "model.safetensors").resolve()]
    ranges = [r for f in files for r in _mapped_ranges(f)]
    assert ranges
    for name, p in model.named_parameters():
        if p.nbytes % ALIGN == 0:  # written first: aligned, so mapped
            assert any(lo <= p.data_ptr() < hi for lo, hi in ranges), f"{name} was copied"
        assert p.data_ptr() % ALIGN == 0, name


def _misaligned_copy(file: Path, dst: Path):
    """file's tensors and metadata written by safetensors' own save_file (data aligned to 8 bytes only), its
    header padded until the data starts off an ALIGN boundary."""
    sd, meta = load_file(file), read_safetensors_header(file)[1].get("__metadata__", {})
    for pad in range(ALIGN):
        save_file(sd, str(dst), metadata={**meta, "pad": "x" * pad})
        if read_safetensors_header(dst)[0] % ALIGN:
            return


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_a_misaligned_file_is_read_into_aligned_memory_on_the_cpu(tmp_path, ckpts, ref):
    """safetensors' save_file aligns the data to 8 bytes: mapped, a weight would make the CPU's vector loads
    straddle cache lines; loaded on the CPU without a cast, each such tensor is read into memory of its own."""
    paths = copy_ckpt(ckpts["B"], tmp_path)
    file = paths["model"] / "model.safetensors"
    _misaligned_copy(ckpts["B"]["model"] / "model.safetensors", file)
    model = load(paths)
    assert_same_state(model, ref)
    llm = dict(model.language_model.named_parameters())
    assert all(p.data_ptr() % ALIGN == 0 for p in llm.values())
    ranges = _mapped_ranges(file.resolve())
    assert any(not any(lo <= p.data_ptr() < hi for lo, hi in ranges) for p in llm.values())  # read, not mapped


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_inference_loads_q_k_v_and_gate_up_as_one_layer_each(tmp_path, ckpts, ref):
    """load_llava(inference=True) on the CPU: each attention's q, k, v one DecodeLinear, each MLP's gate, up another,
    their weights the separate ones side by side, never at the price of a copy the separate layers would not make:
    mapped from our files (which write them so); read from a file written by safetensors' save_file (names sorted:
    q, k, v apart; misaligned, so read anyway) and when cast; left apart where they stay mapped apart (a group split
    between two shards, a pickle). The same logits as a training load; such a model cannot be saved."""
    theirs = copy_ckpt(ckpts["B"], tmp_path / "theirs")
    _misaligned_copy(ckpts["B"]["model"] / "model.safetensors", theirs["model"] / "model.safetensors")
    sharded = {**ckpts["B"], "model": tmp_path / "sharded"}
    sharded["model"].mkdir()
    save_module.write_safetensors(load_file(ckpts["B"]["model"] / "model.safetensors"), sharded["model"],
                                  max_shard_bytes=40_000)
    shutil.copyfile(ckpts["B"]["model"] / "config.json", sharded["model"] / "config.json")
    pickled = copy_ckpt(ckpts["B"], tmp_path / "pickled")
    torch.save(load_file(pickled["model"] / "model.safetensors"), pickled["model"] / "pytorch_model.bin")
    (pickled["model"] / "model.safetensors").unlink()
    shard_of = json.loads((sharded["model"] / "model.safetensors.index.json").read_text())["weight_map"]
    ours, seen = ckpts["B"]["model"] / "model.safetensors", {}
    split = lambda keys: len({shard_of[k] for k in keys}) > 1  # noqa: E731
    for label, paths, dtype, mapped, apart in (("ours", ckpts["B"], None, True, None),
                                               ("theirs", theirs, None, False, None),
                                               ("ours", ckpts["B"], torch.bfloat16, False, None),
                                               ("pickled", pickled, torch.bfloat16, False, None),
                                               ("sharded", sharded, None, True, split),
                                               ("pickled", pickled, None, None, lambda keys: True)):
        cases = seen.setdefault((label, dtype), [])
        model = load(paths, dtype=dtype, inference=True)
        files = [ours, theirs["model"] / "model.safetensors", *(sharded["model"] / f for f in set(shard_of.values()))]
        ranges = [r for f in files for r in _mapped_ranges(f.resolve())]
        for i, (layer, want) in enumerate(zip(model.language_model.model.layers, ref.language_model.model.layers)):
            for module, joined_name, names in ((layer.self_attn, "qkv_proj", ("q_proj", "k_proj", "v_proj")),
                                               (layer.mlp, "gate_up_proj", ("gate_proj", "up_proj"))):
                parts = [getattr(getattr(want, "self_attn" if joined_name == "qkv_proj" else "mlp"), n) for n in names]
                keys = [f"model.layers.{i}.{'self_attn' if joined_name == 'qkv_proj' else 'mlp'}.{n}.weight"
                        for n in names]
                joined = getattr(module, joined_name)
                if apart is not None and apart(keys):  # left as stored: mapped apart, no block
                    assert joined is None and all(hasattr(module, n) for n in names), (paths, keys)
                    cases.append("apart")
                    continue
                w = joined.weight
                assert type(joined) is DecodeLinear and joined.parts == [p.out_features for p in parts]
                assert torch.equal(w, torch.cat([p.weight for p in parts]).to(w.dtype)), (paths, dtype)
                in_file = any(lo <= w.data_ptr() < hi for lo, hi in ranges)
                assert w.data_ptr() % ALIGN == 0 and in_file == mapped, (paths, dtype, keys)
                assert not any(hasattr(module, n) for n in names)  # not kept twice
                cases.append("mapped" if mapped else "read")
        torch.testing.assert_close(logits(model), logits(load(paths, dtype=dtype)), atol=1e-5, rtol=1e-5)
        if model.language_model.model.layers[0].self_attn.qkv_proj is not None:
            with pytest.raises(RuntimeError, match="joined for inference"):
                model.state_dict()
    assert set(seen[("sharded", None)]) == {"mapped", "apart"}  # the shards split some groups, not all
    assert set(seen[("pickled", None)]) == {"apart"} and set(seen[("theirs", None)]) == {"read"}


def test_write_safetensors_aligns_the_data_and_keeps_every_tensor(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"odd": torch.randn(3, generator=g), "w": torch.randn(16, 16, generator=g),
               "b": torch.randn(5, generator=g).bfloat16(), "i": torch.arange(4), "h": torch.randn(8, 4).half(),
               "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3)}
    save_module.write_safetensors(tensors, tmp_path, metadata={"a": "b"})
    file = tmp_path / "model.safetensors"
    back = load_file(file)
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], t) and back[k].dtype == t.dtype
                                                 for k, t in tensors.items())
    start, header = read_safetensors_header(file)
    assert header["__metadata__"] == {"format": "pt", "a": "b"} and start % ALIGN == 0
    for key in ("w", "h"):  # whole multiples of ALIGN bytes: first, so aligned
        assert header[key]["data_offsets"][0] % ALIGN == 0, key
    for bad in ({"n": 1}, {"n": None}):  # safetensors readers want str -> str: refused when writing
        with pytest.raises(ValueError, match="metadata must map str to str"):
            save_module.write_safetensors(tensors, tmp_path / "bad", metadata=bad)


def test_tied_embeddings(tmp_path):
    cfg = TINY.replace(text=dataclasses.replace(TINY.text, tie_word_embeddings=True))
    ref = random_llava(cfg, seed=3)
    for layout in ("A", "C"):
        paths = write_layout(ref, tmp_path / layout, layout)
        model = load(paths)
        lm = model.language_model
        assert lm.lm_head.weight is lm.model.embed_tokens.weight
        assert_same_state(model, ref)
    assert keymaps.LM_HEAD_KEY not in load_file(tmp_path / "A" / "model.safetensors")
    # A file that does carry the head must carry the same matrix.
    edit_tensors(tmp_path / "A" / "model.safetensors",
                 lambda t: t.__setitem__(keymaps.LM_HEAD_KEY, torch.zeros_like(t[keymaps.EMBED_KEY])))
    with pytest.raises(CheckpointError, match="tie_word_embeddings=true but the checkpoint's lm_head differs"):
        load_llava(tmp_path / "A")


def test_pickle_bin_loads_only_through_weights_only(tmp_path, ckpts, ref):
    paths = copy_ckpt(ckpts["B"], tmp_path)
    st = paths["model"] / "model.safetensors"
    torch.save(load_file(st), paths["model"] / "pytorch_model.bin")  # a plain state dict: allowed
    st.unlink()
    assert_same_state(load(paths), ref)

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    # Sharded pickles, with their index, load the same way.
    state = torch.load(paths["model"] / "pytorch_model.bin", weights_only=True)
    (paths["model"] / "pytorch_model.bin").unlink()
    keys = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": keys[:10], "pytorch_model-00002-of-00002.bin": keys[10:]}
    for name, ks in shards.items():
        torch.save({k: state[k] for k in ks}, paths["model"] / name)
    (paths["model"] / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"weight_map": {k: name for name, ks in shards.items() for k in ks}}))
    assert_same_state(load(paths), ref)
    for name in (*shards, "pytorch_model.bin.index.json"):
        (paths["model"] / name).unlink()

    with open(paths["model"] / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.norm.weight": Payload()}, f)
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin: .*\n.*convert it once to safetensors"):
        load(paths)
    assert not (tmp_path / "pwned").exists()


# ----------------------------------------------------------------------------------------------------------
# Saving

def test_save_llava_round_trip_is_bitwise(tmp_path, ref):
    tok = Path(train_tiny_spm(tmp_path / "tok"))
    out = save_llava(ref, tmp_path / "out", tokenizer=tok)
    assert (out / "tokenizer.model").read_bytes() == tok.read_bytes()
    # the settings in force are written beside it (here transformers' defaults: the source has no config)
    saved = json.loads((out / "tokenizer_config.json").read_text())
    assert (saved["legacy"], saved["add_bos_token"], saved["add_eos_token"]) == (True, True, False)
    assert saved["tokenizer_class"] == "LlamaTokenizer"
    model = load_llava(out)
    assert model.config == ref.config
    assert_same_state(model, ref)
    sharded = save_llava(ref, tmp_path / "sharded", max_shard_bytes=50_000)
    assert (sharded / "model.safetensors.index.json").exists()
    assert_same_state(load_llava(sharded), ref)


def test_saved_tokenizer_keeps_its_settings(tmp_path, ref):
    """A legacy=false tokenizer (Vicuna-v1.5's) or an override stays what it was in the saved checkpoint; the
    source's other tokenizer_config.json keys are kept."""
    src = tmp_path / "vicuna"
    train_tiny_spm(src)
    (src / "tokenizer_config.json").write_text(json.dumps({"legacy": False, "model_max_length": 4096}))
    out = save_llava(ref, tmp_path / "a", tokenizer=src)
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 4096
    assert Tokenizer(out).legacy is False and "tokenizer_config.json" in Tokenizer(out).settings_source
    out = save_llava(ref, tmp_path / "b", tokenizer=Tokenizer(src, legacy=True))
    assert Tokenizer(out).legacy is True


def test_save_llava_adds_image_token_for_sentinel_models(tmp_path, ckpts, ref):
    original = load(ckpts["B"])  # image sentinel -200: no <image> in its vocabulary
    out = save_llava(original, tmp_path / "hf")
    model = load_llava(out)
    V = TINY.text.vocab_size
    assert (model.config.image_token_id, model.config.pad_token_id) == (V, V + 1)
    assert model.config.text.vocab_size == 384  # 320 + 2, padded to a multiple of 64
    emb = model.language_model.model.embed_tokens.weight
    assert torch.equal(emb[:V], ref.language_model.model.embed_tokens.weight)
    torch.testing.assert_close(logits(model)[..., :V], logits(original), atol=1e-6, rtol=0)


@pytest.mark.parametrize("projector_type", ["linear", "mlp2x_gelu"])
def test_save_projector_round_trip(tmp_path, ckpts, projector_type):
    ref = random_llava(TINY.replace(projector_type=projector_type), seed=1)
    file = save_projector(ref, tmp_path / "stage1" / "mm_projector.safetensors")
    from safetensors import safe_open
    with safe_open(str(file), "pt") as f:
        assert f.metadata()["mm_projector_type"] == projector_type
        expected = {"model.mm_projector.weight", "model.mm_projector.bias"} if projector_type == "linear" else \
            {f"model.mm_projector.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
        assert set(f.keys()) == expected
    # The projector type comes from the file's metadata; the LLM and CLIP from the layout-C dirs.
    model = load_llava(ckpts["C"]["model"], vision_path=ckpts["C"]["vision"], projector_path=file.parent)
    assert model.config.projector_type == projector_type
    assert_same_state(model.multi_modal_projector, ref.multi_modal_projector)
    with pytest.raises(CheckpointError, match=f"holds a '{projector_type}' projector, not 'mlp3x_gelu'"):
        load_llava(ckpts["C"]["model"], vision_path=ckpts["C"]["vision"], projector_path=file,
                   projector_type="mlp3x_gelu")


def test_layout_c_new_projector(ckpts, ref):
    torch.manual_seed(0)
    model = load_llava(ckpts["C"]["model"], vision_path=ckpts["C"]["vision"], new_projector=True,
                       projector_type="linear", dtype=torch.bfloat16)
    assert model.config.projector_type == "linear"
    w = model.multi_modal_projector.linear_1.weight
    assert w.dtype == torch.bfloat16 and not w.is_meta and w.std() > 0
    assert torch.equal(model.language_model.lm_head.weight, ref.language_model.lm_head.weight.bfloat16())
    with pytest.raises(CheckpointError, match="give the stage-1 projector file"):
        load_llava(ckpts["C"]["model"], vision_path=ckpts["C"]["vision"])


def test_save_is_atomic(tmp_path, ref, monkeypatch):
    out = save_llava(ref, tmp_path / "out", max_shard_bytes=50_000)  # an existing checkpoint, sharded
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = []
    real = save_module.write_json

    def fail_after_weights(*args):  # the weights are written, the config is not: the save dies midway
        calls.append(args)
        raise OSError("disk full")

    monkeypatch.setattr(save_module, "write_json", fail_after_weights)
    other = random_llava(TINY, seed=7)
    with pytest.raises(OSError, match="disk full"):
        save_llava(other, out)
    assert calls and {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary left behind
    monkeypatch.setattr(save_module, "write_json", real)
    save_llava(other, out)  # replaces the sharded checkpoint entirely: no stale shard survives
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert_same_state(load_llava(out), other)
    with pytest.raises(OSError, match="disk full"):
        monkeypatch.setattr(save_module, "fsync", lambda p: (_ for _ in ()).throw(OSError("disk full")))
        save_projector(other, tmp_path / "proj.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ----------------------------------------------------------------------------------------------------------
# Bad input: a clear error naming the file and the problem

def test_missing_directory_config_and_weights(tmp_path, ckpts):
    with pytest.raises(CheckpointError, match=f"checkpoint directory {tmp_path / 'nope'} does not exist"):
        load_llava(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'empty' / 'config.json'} is missing"):
        load_llava(tmp_path / "empty")
    paths = copy_ckpt(ckpts["A"], tmp_path)
    (paths["model"] / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"holds no weights: expected one of model.safetensors.index.json"):
        load(paths)
    (paths["model"] / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        load(paths)


def test_missing_and_inconsistent_shards(tmp_path, ref):
    paths = write_layout(ref, tmp_path / "s", "A", max_shard_bytes=40_000)
    index = paths["model"] / "model.safetensors.index.json"
    shard = sorted(paths["model"].glob("model-*.safetensors"))[1]
    key = next(iter(load_file(shard)))
    edit_json(index, lambda d: d["weight_map"].__setitem__(key, "model-00001-of-00009.safetensors"))
    with pytest.raises(CheckpointError, match="names shard model-00001-of-00009.safetensors, which is missing"):
        load(paths)
    edit_json(index, lambda d: d["weight_map"].__setitem__(key, sorted(paths["model"].glob("model-*"))[0].name))
    with pytest.raises(CheckpointError, match=f"disagree on which tensors the shard holds .*{key}"):
        load(paths)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_safetensors(tmp_path, ckpts, damage):
    paths = copy_ckpt(ckpts["C"], tmp_path)
    file = paths["vision"] / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes({"truncated": data[:len(data) // 2], "garbage": b"\x00garbage" * 50, "empty": b""}[damage])
    with pytest.raises(CheckpointError, match=f"{file} is not a readable safetensors file"):
        load(paths)


def test_missing_unexpected_and_misshaped_tensors(tmp_path, ckpts):
    paths = copy_ckpt(ckpts["A"], tmp_path)
    file = paths["model"] / "model.safetensors"
    edit_tensors(file, lambda t: t.pop("language_model.model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=rf"missing tensor language_model.model.layers.1.mlp.up_proj.weight "
                                              rf"\(not in {file}\)"):
        load(paths)
    paths = copy_ckpt(ckpts["C"], tmp_path / "c")
    edit_tensors(paths["vision"] / "model.safetensors", lambda t: t.pop("vision_model.encoder.layers.2.mlp.fc1.bias"))
    with pytest.raises(CheckpointError, match=rf"missing tensor vision_model.encoder.layers.2.mlp.fc1.bias "
                                              rf"\(not in {paths['vision'] / 'model.safetensors'}\)"):
        load(paths)
    paths = copy_ckpt(ckpts["B"], tmp_path / "b")
    file = paths["model"] / "model.safetensors"
    # Not in keymaps.IGNORED, so an error even though it looks like a harmless buffer.
    edit_tensors(file, lambda t: t.__setitem__("model.layers.0.self_attn.rotary_emb.cos_cached", torch.ones(2)))
    with pytest.raises(CheckpointError, match=f"unexpected tensor model.layers.0.self_attn.rotary_emb.cos_cached "
                                              f"in {file}"):
        load(paths)
    edit_tensors(file, lambda t: (t.pop("model.layers.0.self_attn.rotary_emb.cos_cached"),
                                  t.__setitem__("model.mm_projector.2.weight", torch.zeros(64, 65))))
    with pytest.raises(CheckpointError, match=rf"tensor model.mm_projector.2.weight in {file}: expected shape "
                                              r"\(64, 64\), found \(64, 65\)"):
        load(paths)


def test_config_that_does_not_match_the_weights(tmp_path, ckpts):
    paths = copy_ckpt(ckpts["A"], tmp_path)
    config = paths["model"] / "config.json"
    edit_json(config, lambda d: d["text_config"].__setitem__("intermediate_size", 80))
    with pytest.raises(CheckpointError, match=rf"{config} does not match the weights .*\n.*mlp.down_proj.weight "
                                              r"in .*: expected shape \(64, 80\), found \(64, 96\)"):
        load(paths)
    edit_json(config, lambda d: d["text_config"].update(intermediate_size=96, num_hidden_layers=1))
    with pytest.raises(CheckpointError, match=rf"\(config: {config}\):\n  unexpected tensor "
                                              r"language_model.model.layers.1"):
        load(paths)
    edit_json(config, lambda d: d.__setitem__("model_type", "llava_onevision"))
    with pytest.raises(CheckpointError, match="unknown model_type 'llava_onevision'"):
        load(paths)
    edit_json(config, lambda d: (d.__setitem__("model_type", "llava"),
                                 d["text_config"].__setitem__("model_type", "qwen2")))
    with pytest.raises(CheckpointError, match=f"{config}: unsupported language model_type 'qwen2'"):
        load(paths)


def test_layout_b_needs_its_clip_dir(tmp_path, ckpts, ref):
    paths = copy_ckpt(ckpts["B"], tmp_path)
    with pytest.raises(CheckpointError, match=r"original LLaVA checkpoint .* Pass the CLIP directory .* "
                                              r"mm_vision_tower='openai/clip-vit-large-patch14-336', which is not"):
        load_llava(paths["model"])
    with pytest.raises(CheckpointError, match=f"CLIP directory {tmp_path / 'nope'} does not exist"):
        load_llava(paths["model"], vision_path=tmp_path / "nope")
    config = paths["model"] / "config.json"
    edit_json(config, lambda d: d.__setitem__("mm_vision_tower", str(paths["vision"])))  # a local dir: used
    assert_same_state(load_llava(paths["model"]), ref)
    edit_json(config, lambda d: d.__setitem__("mm_use_im_start_end", True))
    with pytest.raises(CheckpointError, match=r"mm_use_im_start_end=true .* is not supported"):
        load_llava(paths["model"])
    edit_json(config, lambda d: d.update(mm_use_im_start_end=False, mm_hidden_size=1024))
    with pytest.raises(CheckpointError, match=r"mm_hidden_size 1024 but the CLIP tower in .* has hidden_size 32"):
        load_llava(paths["model"])

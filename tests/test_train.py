"""train.py end to end on a tiny LLaVA (layout C checkpoint) and the synthetic dataset in the official formats:
what each stage trains, the outputs loading in minillava and transformers, exact resume after SIGKILL, torchrun
(2 processes, gloo) against one process, bad data, non-finite losses and a full disk."""
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minillava import train
from minillava import synthetic
from minillava.config import get_preset
from minillava.weights import load_llava, write_random_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = get_preset("tiny")
CFG = TINY.replace(text=dataclasses.replace(TINY.text, vocab_size=512))  # room for the synthetic tokenizer


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    paths = synthetic.write_dataset(str(root / "data"), n_train=24, n_test=0, seed=0, image_size=32)
    tok = synthetic.train_tokenizer(paths["corpus"], str(root / "tok"), vocab_size=CFG.text.vocab_size)
    ckpt = write_random_checkpoint(root / "ckpt", CFG, "C", seed=0, tokenizer=tok)
    return {"root": root, "data": root / "data", "pretrain": paths["pretrain"], "instruct": paths["instruct"],
            "llama": str(ckpt["model"]), "clip": str(ckpt["vision"]), "projector": str(ckpt["projector"])}


def argv(env, stage, out, *extra, steps=3):
    a = ["--stage", str(stage), "--model", env["llama"], "--vision", env["clip"],
         "--data", str(env["pretrain"] if stage == 1 else env["instruct"]), "--image-folder", str(env["data"]),
         "--out", str(out), "--micro-batch", "2", "--global-batch", "4", "--max-length", "256",
         "--max-steps", str(steps), "--log-every", "1", "--no-grad-checkpointing", "--warmup-ratio", "0.3",
         "--threads", "1"]
    if stage == 2 and "--projector" not in extra:
        a += ["--projector", env["projector"]]
    return a + list(extra)


def _interruptible():
    # A job started in the background by a shell (as a CI runner may start this suite) inherits SIGINT ignored,
    # and Python then installs no KeyboardInterrupt handler; a user's terminal would deliver Ctrl-C.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_script(args, launcher=()):
    """train.py in a fresh process (what a user runs), in its own process group (see finish), with Ctrl-C
    handled as in a terminal."""
    return subprocess.Popen([sys.executable, *launcher, str(ROOT / "train.py"), *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, preexec_fn=_interruptible)


def finish(proc, timeout=120, expect=0) -> str:
    """Wait for a run_script process; on timeout kill its whole group (torchrun's workers too) and fail."""
    try:
        out = proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out = proc.communicate()[0]
        pytest.fail(f"timed out after {timeout}s:\n{out[-3000:]}")
    assert proc.returncode == expect, out[-3000:]
    return out


def signal_when_logged(proc, out, n_lines, sig, timeout=60):
    """Send `sig` to a run_script process once its OUT/log.jsonl has n_lines lines (or give up when it ends)."""
    log = Path(out) / "log.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and sum(1 for _ in open(log)) >= n_lines:
            proc.send_signal(sig)
            return
        time.sleep(0.005)


def log_lines(out):
    return [json.loads(line) for line in open(Path(out) / "log.jsonl")]


def tensors(path) -> dict:
    path = Path(path)
    return load_file(path / "model.safetensors" if path.is_dir() else path)


@pytest.mark.parametrize("anyres", [False, True])
def test_a_text_only_batch_runs_the_image_path_and_changes_no_number(anyres):
    """LossModel gives a micro-batch without images a zero image (so every rank runs the same collectives): the loss
    and the LLM's gradients are bitwise those of the text alone; the image path gets gradients of exactly 0."""
    from minillava.weights import random_llava
    model = random_llava(CFG, seed=0)
    if anyres:
        model.use_anyres()
    train.set_trainable(model, types.SimpleNamespace(stage=2, lora=0))
    ids = torch.randint(3, 500, (2, 9), generator=torch.Generator().manual_seed(0))
    labels = ids.masked_fill(torch.arange(9) < 4, -100)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, 7:] = False

    def grads(loss):
        model.zero_grad(set_to_none=True)
        loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain = model.loss(ids, labels, attention_mask=mask)[0]
    g_plain = grads(plain)
    zeroed = train.LossModel(model)(ids, labels, mask, None, None)
    g_zeroed = grads(zeroed)
    assert torch.equal(zeroed, plain)
    image_path = [n for n in g_zeroed if n.startswith("multi_modal_projector.") or n == "image_newline"]
    assert len(image_path) == 4 + anyres
    for n, g in g_zeroed.items():
        if n in image_path:
            assert g_plain[n] is None and torch.count_nonzero(g) == 0, n
        else:
            assert torch.equal(g, g_plain[n]), n


def test_lr_schedule_warmup_then_cosine():
    total, warmup = 10, 3
    s = [train.lr_scale(i, total, warmup) for i in range(total)]
    assert s[:3] == pytest.approx([1 / 3, 2 / 3, 1.0]) and s[3] == 1.0
    assert all(a > b for a, b in zip(s[3:], s[4:])) and s[-1] == pytest.approx(0.5 * (1 + torch.cos(
        torch.tensor(torch.pi * 6 / 7)).item()))


@pytest.mark.parametrize("stage, lora", [(1, 0), (2, 0), (2, 4)])
def test_what_trains_and_at_which_lr(stage, lora):
    from minillava.llava import Llava
    model = Llava(TINY)
    cfg = train.resolve(train.TrainConfig(stage=stage, lora=lora, model="m", data="d"))
    train.set_trainable(model, cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    projector = {n for n in trainable if n.startswith("multi_modal_projector.")}
    assert projector == {n for n, _ in model.named_parameters() if n.startswith("multi_modal_projector.")}
    rest = trainable - projector
    if stage == 1:
        assert not rest
    elif lora:
        assert rest and all(n.endswith(("lora_A", "lora_B")) for n in rest)
    else:
        assert rest == {n for n, _ in model.named_parameters() if n.startswith("language_model.")}
    # CLIP is frozen and records no graph (the same as running it under no_grad)
    feats = model.vision_tower(torch.randn(1, 3, 32, 32))
    assert not feats.requires_grad and feats.grad_fn is None and not model.vision_tower.training
    groups = train.param_groups(model, cfg)
    assert sum(len(g["params"]) for g in groups) == len(trainable)
    for g in groups:
        is_projector = any(p is q for p in g["params"] for q in model.multi_modal_projector.parameters())
        assert g["base_lr"] == (cfg.projector_lr if is_projector else cfg.lr)
        assert g["weight_decay"] == 0.0  # the recipe's
    assert cfg.projector_lr == (2e-5 if lora else cfg.lr)


def test_stage1_trains_only_the_projector(env, tmp_path):
    result = train.main(argv(env, 1, tmp_path / "s1", "--save-every", "2"))
    model = result["model"]
    assert result["output"] == str(tmp_path / "s1" / "mm_projector.safetensors")
    torch.manual_seed(42)  # the projector train.py starts from: fresh, from --seed (default 42)
    start = load_llava(env["llama"], vision_path=env["clip"], new_projector=True)
    after, before = model.state_dict(), start.state_dict()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == sorted(k for k in before if k.startswith("multi_modal_projector."))
    # the output file is the trained projector; loading it with the frozen parts gives the trained model
    reloaded = load_llava(env["llama"], vision_path=env["clip"], projector_path=result["output"])
    assert all(torch.equal(v, after[k]) for k, v in reloaded.state_dict().items())
    # checkpoints hold only what trains (+ optimizer, step, RNG), the frozen sources are recorded
    ck = torch.load(tmp_path / "s1" / "checkpoints" / "step_0000003.pt", weights_only=True)
    assert sorted(ck["model"]) == sorted(f"llava.{k}" for k in changed) and ck["step"] == 3
    assert any(k.endswith("llama/model.safetensors") for k in ck["sources"])
    assert sorted(ck["frozen"]) == sorted(k for k in before if k not in changed)
    lines = log_lines(tmp_path / "s1")
    assert [r["step"] for r in lines] == [1, 2, 3]
    assert {"loss", "lr", "tokens_per_s", "images_per_s", "elapsed_s", "left_s", "peak_mem_gib"} <= set(lines[0])


@pytest.fixture(scope="module")
def stage2(env, tmp_path_factory):
    out = tmp_path_factory.mktemp("s2") / "out"
    return out, train.main(argv(env, 2, out, steps=2))


def test_stage2_keeps_clip_and_writes_layout_a(env, stage2):
    out, result = stage2
    assert sorted(os.listdir(out)) == sorted(["checkpoints", "config.json", "data_report.json", "log.jsonl",
                                              "model.safetensors", "tokenizer.model", "tokenizer_config.json",
                                              "train_config.json"])
    start = load_llava(env["llama"], vision_path=env["clip"], projector_path=env["projector"]).state_dict()
    saved = load_llava(out).state_dict()  # layout A; the -200 model got <image>/<pad> rows appended
    V = CFG.text.vocab_size
    for k, v in start.items():
        if k.startswith("vision_tower."):
            assert torch.equal(saved[k], v), k  # CLIP: bitwise unchanged
        elif k.startswith(("multi_modal_projector.", "language_model.model.layers.")):
            assert not torch.equal(saved[k], v), k  # trained
    assert torch.equal(saved["language_model.lm_head.weight"][:V], result["model"].language_model.lm_head.weight)
    from minillava import generation  # ... and generate.py answers with it (the tokenizer came along)
    model, tok = generation.load(str(out), dtype="fp32", device="cpu")
    image = env["data"] / json.load(open(env["instruct"]))[0]["image"]
    [reply] = generation.answer(model, tok, [(str(image), "What color is the circle?")], max_new_tokens=3)
    assert isinstance(reply, str)


def test_stage2_with_anyres_trains_the_newline_and_writes_a_llava_next_model(env, tmp_path):
    """LLaVA-1.6's recipe from a 1.5 start: --image-aspect-ratio anyres adds image_newline (trained with the
    projector, a sample's image positions counted from its size) and the output is a llava_next checkpoint that
    minillava and transformers load and answer with."""
    out = tmp_path / "out"
    result = train.main(argv(env, 2, out, "--image-aspect-ratio", "anyres", "--template", "mistral_instruct",
                             steps=2))
    model = result["model"]
    assert model.config.anyres and model.config.image_grid_pinpoints == ((32, 64), (64, 32), (64, 64), (96, 32),
                                                                         (32, 96))
    C = CFG.text.hidden_size
    fresh = torch.randn(C, generator=torch.Generator().manual_seed(42)) * C ** -0.5  # use_anyres's draw
    assert not torch.equal(model.image_newline.detach(), fresh)  # trained
    assert json.load(open(out / "config.json"))["model_type"] == "llava_next"
    saved = load_llava(out)
    assert saved.config == model.config.replace(image_token_id=saved.config.image_token_id,
                                                pad_token_id=saved.config.pad_token_id,
                                                text=saved.config.text)
    assert torch.equal(saved.image_newline, model.image_newline.detach())
    # a 32x32 image: 1x2 tiles, a 4x8 map of which the middle 4x4 is image: 16 + 4 x (4 + 1) positions
    assert model.config.image_positions((32, 32)) == 36
    records = json.load(open(env["instruct"]))
    from minillava import generation
    m, tok = generation.load(str(out), dtype="fp32", device="cpu")
    image = env["data"] / records[0]["image"]
    [reply] = generation.answer(m, tok, [(str(image), "What color is the circle?")], template="mistral_instruct",
                              max_new_tokens=3)
    assert isinstance(reply, str)
    transformers = pytest.importorskip("transformers")
    transformers.LlavaNextForConditionalGeneration.from_pretrained(out)


def test_an_export_that_fails_midway_never_leaves_a_loadable_mix(env, stage2, tmp_path, monkeypatch):
    """The export into OUT (beside the log and checkpoints) commits with config.json: removed first, renamed in
    last. A failure in between leaves OUT without a config.json (loading it is an error naming that), never the
    old config.json over a mix of shards; the next export completes."""
    out, result = stage2
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    cfg = types.SimpleNamespace(stage=2, out=str(copy))
    tokenizer = str(out / "tokenizer.model")
    real = os.replace

    def full_disk(src, dst):
        if str(dst).endswith(".safetensors"):
            raise OSError("disk full")
        return real(src, dst)
    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError, match="disk full"):
        train.export(result["model"], cfg, tokenizer)
    assert not (copy / "config.json").exists()
    with pytest.raises(Exception, match="config.json"):
        load_llava(copy)
    monkeypatch.setattr(os, "replace", real)
    train.export(result["model"], cfg, tokenizer)
    loaded = load_llava(copy).state_dict()
    assert all(torch.equal(v, loaded[k]) for k, v in load_llava(out).state_dict().items())


def test_stage2_output_matches_transformers(stage2):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    out, result = stage2
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(out).eval()
    model = load_llava(out)
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(1, 3, 32, 32, generator=g)
    text = torch.randint(3, 300, (1, 9), generator=g)
    ids = torch.cat([text[:, :2], torch.tensor([[cfg.image_token_id]]), text[:, 2:]], 1)
    hf_ids = torch.cat([text[:, :2], torch.full((1, cfg.num_image_tokens), cfg.image_token_id), text[:, 2:]], 1)
    with torch.no_grad():
        ours = model(ids, pixels)
        theirs = hf(input_ids=hf_ids, pixel_values=pixels).logits
        trained = result["model"](torch.where(ids == cfg.image_token_id, -200, ids), pixels)  # the -200 model
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max() <= 1e-4
    assert (ours[..., :CFG.text.vocab_size] - trained).abs().max() <= 1e-5


def test_resume_after_sigkill_is_bitwise_exact(env, tmp_path):
    """LoRA with dropout: the data position, optimizer, schedule and RNG streams must all come back."""
    args = ["--lora", "4", "--lora-dropout", "0.1", "--save-every", "3"]
    finish(run_script(argv(env, 2, tmp_path / "ref", *args, steps=12)))
    killed = run_script(argv(env, 2, tmp_path / "run", *args, steps=12))
    signal_when_logged(killed, tmp_path / "run", 8, signal.SIGKILL)  # past the checkpoint at step 6
    assert killed.wait(60) == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (tmp_path / "run" / "model.safetensors").exists()
    assert "resumed from" in finish(run_script(argv(env, 2, tmp_path / "run", *args, "--resume", steps=12)))
    a, b = tensors(tmp_path / "ref"), tensors(tmp_path / "run")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ref_log = {r["step"]: r["loss"] for r in log_lines(tmp_path / "ref")}
    run_log = [r for r in log_lines(tmp_path / "run") if "step" in r and "loss" in r]
    assert all(r["loss"] == ref_log[r["step"]] for r in run_log)
    # the steps the killed run logged past its checkpoint are not repeated: each step once, then the resume mark
    assert [r["step"] for r in run_log] == list(range(1, 13))
    assert [r for r in log_lines(tmp_path / "run") if "event" in r] == [{"event": "resume", "step": 6}]


def test_ctrl_c_says_where_the_checkpoint_is_and_how_to_resume(env, tmp_path):
    args = argv(env, 2, tmp_path / "run", "--save-every", "2", steps=200)
    proc = run_script(args)
    signal_when_logged(proc, tmp_path / "run", 3, signal.SIGINT)  # past the checkpoint at step 2: Ctrl-C
    out = finish(proc, expect=130)
    assert "Traceback" not in out
    assert "interrupted; the last checkpoint is " + str(tmp_path / "run" / "checkpoints" / "step_") in out
    assert "Continue from it with:\n  python train.py " in out and out.rstrip().endswith("--resume")


def test_out_that_is_a_file_and_a_missing_model(env, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(train.TrainingError, match="--out .*file is a file"):
        train.main(argv(env, 2, tmp_path / "file", steps=1))
    args = argv(env, 2, tmp_path / "never", steps=1)
    args[args.index("--model") + 1] = str(tmp_path / "no-such-model")
    with pytest.raises(Exception, match="no-such-model"):
        train.main(args)
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
def test_torchrun_two_processes_match_one(env, tmp_path, mode):
    extra = ["--ddp"] if mode == "ddp" else []
    finish(run_script(argv(env, 2, tmp_path / "one", steps=4)))
    finish(run_script(argv(env, 2, tmp_path / "two", *extra, steps=4),  # --standalone: a free port
                      launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")))
    l1, l2 = log_lines(tmp_path / "one"), log_lines(tmp_path / "two")
    assert [r["step"] for r in l1] == [r["step"] for r in l2] == [1, 2, 3, 4]
    for r1, r2 in zip(l1, l2):  # the same global batches: equal up to fp32 reduction order
        assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-5)
        assert r2["grad_norm"] == pytest.approx(r1["grad_norm"], rel=1e-4)
        assert r1["tokens_per_s"] > 0 and r2["images_per_s"] > 0
    a, b = tensors(tmp_path / "one"), tensors(tmp_path / "two")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)


def write_mixed_data(env, path, n_image, n_text):
    """LLaVA-1.5's mix in miniature: multi-turn image records and text-only ones (ShareGPT-like: no "image" key,
    no <image>), in the official JSON list."""
    records = [r for r in json.load(open(env["instruct"])) if "image" in r]
    assert n_image + n_text <= len(records)
    text = [{"id": f"text_{r['id']}", "conversations": [dict(t, value=t["value"].replace("<image>", "").strip())
                                                        for t in r["conversations"]]}
            for r in records[n_image:n_image + n_text]]
    mixed = [r for pair in zip(records[:n_image], text) for r in pair] + records[len(text):n_image]
    path.write_text(json.dumps(mixed))
    return path


def rank_micro_batches(env, data_path, args, world=2) -> tuple[list, dict]:
    """The schedule train.py follows for `args`: [[rank 0's first micro-batch, rank 1's, ...] per step] of record
    indices, and {index: has an image}."""
    from minillava import data
    from minillava.tokenizer import Tokenizer
    cfg = train.resolve(train.parse_args(args))
    model = load_llava(env["llama"], vision_path=env["clip"], projector_path=env["projector"])
    if cfg.image_aspect_ratio == "anyres":
        model.use_anyres()
    dcfg = data.DataConfig(image_folder=cfg.image_folder, template=cfg.template, tokenizer=Tokenizer(env["llama"]),
                           model=model.config, max_length=cfg.max_length)
    records = data.read_records(str(data_path))
    samples = data.check_records(records, dcfg, range(len(records)), 0)
    batches = data.global_batches(samples, cfg.global_batch, cfg.seed, 0, cfg.group_by_modality_length)
    steps = [[data.micro_batches(gb, world, r, cfg.micro_batch)[0] for r in range(world)]
             for gb in batches[:cfg.max_steps]]
    return steps, {c.index: c.has_image for c in samples}


def ranks_see_different_modalities(env, data_path, args) -> list:
    """The steps (1-based) of a run of `args` in which one rank's micro-batch holds an image and another's none."""
    steps, image = rank_micro_batches(env, data_path, args)
    return [k + 1 for k, micros in enumerate(steps) if len({any(image[i] for i in m) for m in micros}) > 1]


ONE_PROCESS = {}  # (stage, flags) -> the one-process run's out dir, shared by FSDP2 and DDP


@pytest.mark.parametrize("stage, extra, mode", [
    (2, (), "fsdp"), (2, (), "ddp"),  # full fine-tuning, batches of mixed modality
    # LoRA, grouped by modality (the last batch mixes); no dropout: its masks come from each rank's own stream
    (2, ("--lora", "4", "--lora-dropout", "0", "--group-by-modality-length"), "fsdp"),
    (2, ("--lora", "4", "--lora-dropout", "0", "--group-by-modality-length"), "ddp"),
    (2, ("--image-aspect-ratio", "anyres", "--template", "mistral_instruct"), "ddp"),  # image_newline trains too
    (1, ("--template", "vicuna_v1"), "fsdp"),  # stage 1 on the mix: only the projector trains
])
def test_torchrun_ranks_with_different_modalities_match_one(env, tmp_path, stage, extra, mode):
    """Ranks whose micro-batches differ in modality in the same step (one text-only, one with images) run the
    same collectives: the run finishes and its losses and weights equal one process's on the same batches."""
    grouped = "--group-by-modality-length" in extra
    n_image, n_text = (9, 7) if grouped else (8, 8)  # grouped: the last, mixed batch holds both kinds
    data_path = write_mixed_data(env, env["root"] / f"mix_{n_image}_{n_text}.json", n_image, n_text)
    extra = [*extra, "--data", str(data_path)] + ([] if grouped else ["--no-group-by-modality-length"])
    one = ONE_PROCESS.get((stage, tuple(extra)))
    args = argv(env, stage, "OUT", *extra, steps=4)
    assert ranks_see_different_modalities(env, data_path, args), "the data does not test what it should"
    if one is None:
        one = ONE_PROCESS[(stage, tuple(extra))] = tmp_path / "one"
        finish(run_script([str(one) if a == "OUT" else a for a in args]))
    two = tmp_path / "two"
    finish(run_script([str(two) if a == "OUT" else a for a in args] + (["--ddp"] if mode == "ddp" else []),
                      launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")))
    l1, l2 = log_lines(one), log_lines(two)
    assert [r["step"] for r in l1] == [r["step"] for r in l2] == [1, 2, 3, 4]
    for r1, r2 in zip(l1, l2):
        assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-5)
        assert r2["grad_norm"] == pytest.approx(r1["grad_norm"], rel=1e-4)
    name = "mm_projector.safetensors" if stage == 1 else ""
    a, b = tensors(one / name), tensors(two / name)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)


def test_torchrun_rank_that_cannot_load_its_batch_stops_every_rank_with_its_reason(env, tmp_path):
    """The images of rank 1's first micro-batch change after the data check (truncated while the run starts): rank
    1 cannot load it, rank 0 can; both stop at step 1 with the same message naming rank 1 and the file, instead of
    rank 0 waiting for rank 1 in a collective."""
    records = json.load(open(write_mixed_data(env, tmp_path / "mix.json", 16, 0)))
    for r in records:  # each image its own copy, so that breaking one breaks no other test
        if "image" in r:
            shutil.copy(env["data"] / r["image"], tmp_path / Path(r["image"]).name)
            r["image"] = Path(r["image"]).name
    (tmp_path / "mix.json").write_text(json.dumps(records))
    args = [str(tmp_path / "out") if a == "OUT" else a for a in argv(
        env, 2, "OUT", "--data", str(tmp_path / "mix.json"), "--image-folder", str(tmp_path),
        "--no-group-by-modality-length", steps=4)]
    steps, _ = rank_micro_batches(env, tmp_path / "mix.json", args)
    victims = [tmp_path / records[i]["image"] for i in steps[0][1]]
    assert not set(steps[0][0]) & set(steps[0][1])
    proc = run_script(args, launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"))
    for line in proc.stdout:  # once the data check has passed, rank 1's first images break
        if line.startswith("data: "):
            for v in victims:
                v.write_bytes(v.read_bytes()[:60])
            break
    out = finish(proc, expect=1)
    assert out.count("step 1: rank 1 could not load its micro-batch (ValueError: cannot decode image") >= 2, \
        out[-3000:]  # both ranks say it
    assert "rank 0 could not load" not in out


def write_bad_data(env, tmp_path):
    records = json.load(open(env["instruct"]))[:12]
    bad = {2: {**records[2], "image": "images/missing.png"},
           4: {**records[4], "conversations": records[4]["conversations"][:1] + [  # human, human
               {"from": "human", "value": "And?"}, *records[4]["conversations"][1:]]},
           5: {**records[5], "image": "bad.png"},
           7: {**records[7], "conversations": [dict(t, value=t["value"].replace("<image>", ""))
                                               for t in records[7]["conversations"]]}}
    (Path(env["data"]) / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    records = [bad.get(i, r) for i, r in enumerate(records)]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(records))
    return path, [f"#{i + 1} (id {records[i]['id']})" for i in sorted(bad)]


def test_bad_records_refuse_to_start_or_are_skipped_by_name(env, tmp_path, capsys):
    data, names = write_bad_data(env, tmp_path)
    args = argv(env, 2, tmp_path / "out", steps=1) + ["--data", str(data)]
    with pytest.raises(train.TrainingError, match="4 bad record.*--skip-bad-records"):
        train.main(args)
    printed = capsys.readouterr().out
    for name, words in zip(names, ["not found", "roles must alternate", "cannot decode", "0 <image>"]):
        assert f"bad {name}: " in printed and words in printed.split(f"bad {name}: ")[1].split("\n")[0]
    report = json.load(open(tmp_path / "out" / "data_report.json"))
    assert [b["record"] for b in report["bad"]] == names
    assert not (tmp_path / "out" / "log.jsonl").exists() and not (tmp_path / "out" / "checkpoints").exists()

    train.main(args + ["--skip-bad-records"])
    printed = capsys.readouterr().out
    assert all(f"skipped {n}: " in printed for n in names) and "skipping 4 bad record(s)" in printed
    assert "8 usable" in printed


def test_a_wrong_image_folder_is_one_message_not_one_line_per_record(env, tmp_path, capsys):
    args = argv(env, 2, tmp_path / "out", steps=1) + ["--image-folder", str(tmp_path / "elsewhere")]
    with pytest.raises(train.TrainingError, match=r"no image found for 24 of 24 records with an image under "
                                                  r"--image-folder .*elsewhere: check --image-folder"):
        train.main(args)
    printed = capsys.readouterr().out
    bad = [line for line in printed.splitlines() if line.startswith("  bad #")]
    assert len(bad) == 20 and "  ... and 4 more (all in data_report.json)" in printed
    assert bad[0].startswith("  bad #1 (id ")  # records are counted from 1
    assert len(json.load(open(tmp_path / "out" / "data_report.json"))["bad"]) == 24


def test_data_and_batch_mistakes_say_what_to_do(env, tmp_path):
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in json.load(open(env["instruct"]))))
    with pytest.raises(ValueError, match="one JSON list of records.*JSON Lines"):
        train.main(argv(env, 2, tmp_path / "a", steps=1) + ["--data", str(jsonl)])
    with pytest.raises(train.TrainingError, match="do not fill one global batch of 256 .*smaller --global-batch"):
        train.main(argv(env, 2, tmp_path / "b", steps=1) + ["--global-batch", "256"])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="^--device cuda: this machine has no CUDA GPU"):
            train.main(argv(env, 2, tmp_path / "c", steps=1) + ["--device", "cuda"])
    with pytest.raises(ValueError, match=r"--mm-vision-select-layer 9: the tower has 3 layers \(hidden states -4..3"):
        train.main(argv(env, 1, tmp_path / "d", steps=1) + ["--mm-vision-select-layer", "9"])
    with pytest.raises(ValueError, match="--mm-projector-type chooses stage 1's fresh projector"):
        train.main(argv(env, 2, tmp_path / "e", steps=1) + ["--mm-projector-type", "linear"])


def test_stage1_output_answers_in_generate_and_eval(env, tmp_path, capsys):
    """Stage 1 with LLaVA v1's linear projector on CLIP's last layer: its file records both, and the stage-1 model
    (CLIP + LLaMA + that file: layout C) answers through generate.py's --projector and the original's --model-base,
    and eval.py passes both on to it, with the same greedy answer as the model train.py returned (serve.py: in
    tests/test_serve.py)."""
    from minillava import eval as evaluation
    from minillava import generate, generation
    out = tmp_path / "s1"
    result = train.main(argv(env, 1, out, "--mm-projector-type", "linear", "--mm-vision-select-layer", "-1"))
    meta = safe_open_metadata(out / "mm_projector.safetensors")
    assert meta["mm_projector_type"] == "linear" and meta["mm_vision_select_layer"] == "-1"
    image = str(env["data"] / json.load(open(env["pretrain"]))[0]["image"])
    model = result["model"].eval()
    assert model.config.projector_type == "linear" and model.config.vision_feature_layer == -1
    tok = generation.load(env["llama"], env["clip"], projector=str(out / "mm_projector.safetensors"))[1]
    [expected] = generation.answer(model, tok, [(image, "Describe.")], template="plain", max_new_tokens=4)
    capsys.readouterr()
    common = ["--vision", env["clip"], "--image", image, "--prompt", "Describe.", "--template", "plain",
              "--temperature", "0", "--max-new-tokens", "4", "--threads", "1"]
    assert generate.main(["--model", env["llama"], "--projector", str(out / "mm_projector.safetensors")] + common) == 0
    assert capsys.readouterr().out.strip() == expected.strip()
    # the original's spelling: --model-path is the stage-1 output dir, --model-base the LLM it was trained on
    assert generate.main(["--model-path", str(out), "--model-base", env["llama"]] + common) == 0
    assert capsys.readouterr().out.strip() == expected.strip()
    assert generate.main(["--model", env["llama"]] + common) == 1  # layout C without a projector: said how
    assert "--projector" in capsys.readouterr().err
    assert generate.main(["--model", env["llama"], "--projector", "x", "--model-base", "y"] + common) == 1
    assert "not both" in capsys.readouterr().err
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question_id": 0, "image": os.path.basename(image), "text": "Describe."}) + "\n")
    answers = tmp_path / "a.jsonl"
    assert generate.main(["--model", env["llama"], "--vision", env["clip"], "--projector", str(out), "--questions",
                          str(questions), "--answers", str(answers), "--image-folder", os.path.dirname(image),
                          "--template", "plain", "--temperature", "0", "--max-new-tokens", "4", "--threads", "1"]) == 0
    assert json.loads(answers.read_text())["text"].strip() == expected.strip()
    pope = tmp_path / "pope"  # eval.py answers a benchmark with it too, spelled either way
    (pope / "coco").mkdir(parents=True)
    (pope / "llava_pope_test.jsonl").write_text(json.dumps(
        {"question_id": 0, "image": "x.png", "text": "Is there a dog?", "category": "random"}) + "\n")
    (pope / "coco" / "coco_pope_random.json").write_text('{"label": "no"}\n')
    for cat in ("adversarial", "popular"):
        (pope / "coco" / f"coco_pope_{cat}.json").write_text("")
    (pope / "val2014").mkdir()
    shutil.copy(image, pope / "val2014" / "x.png")
    [want] = generation.answer(model, tok, [(image, "Is there a dog?")], template="plain", max_new_tokens=128)
    for k, spelled in enumerate((["--model", env["llama"], "--projector", str(out / "mm_projector.safetensors")],
                                 ["--model-path", str(out), "--model-base", env["llama"]])):
        answers = tmp_path / f"pope{k}.jsonl"
        assert evaluation.main(["answer", "pope", *spelled, "--vision", env["clip"], "--data", str(pope),
                                "--answers", str(answers), "--template", "plain", "--threads", "1"]) == 0
        assert json.loads(answers.read_text())["text"] == want


def safe_open_metadata(path) -> dict:
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def test_tokenizer_legacy_flag_is_printed_reported_and_saved(env, tmp_path, capsys):
    """--tokenizer-legacy false (Vicuna-v1.5's setting) overrides the file's, is printed with the data report,
    the records the original would have masked entirely are counted, and the saved model keeps the setting."""
    out = tmp_path / "out"
    train.main(argv(env, 2, out, steps=1) + ["--tokenizer-legacy", "false"])
    printed = capsys.readouterr().out
    assert "tokenizer: legacy=false add_bos_token=true add_eos_token=false (" in printed
    assert "(overridden: legacy)" in printed
    report = json.load(open(out / "data_report.json"))
    assert len(report["original_masks_all"]) == report["summary"]["original_masks_all"]
    assert json.load(open(out / "tokenizer_config.json"))["legacy"] is False
    with pytest.raises(SystemExit):
        train.main(argv(env, 2, tmp_path / "o2", steps=1) + ["--tokenizer-legacy", "yes"])
    assert "invalid choice: 'yes'" in capsys.readouterr().err


def test_samples_without_supervision_after_truncation_are_reported(env, tmp_path, capsys):
    # max_length 80: in about half of the conversations the first reply starts later than that
    train.main(argv(env, 2, tmp_path / "out", steps=1) + ["--max-length", "80", "--global-batch", "2"])
    printed = capsys.readouterr().out
    report = json.load(open(tmp_path / "out" / "data_report.json"))
    assert 0 < len(report["excluded"]) == report["summary"]["excluded"] < report["summary"]["records"] - 2
    for e in report["excluded"]:
        assert f"left out {e['record']}: " in printed
        assert "no supervised token left" in e["reason"] or "does not fit" in e["reason"]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(env, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real_forward, calls = train.LossModel.forward, []

    def forward(self, **batch):  # 2 micro-batches a step: the loss of step 3 onwards is NaN
        calls.append(1)
        loss = real_forward(self, **batch)
        return loss * float("nan") if len(calls) > 4 else loss

    monkeypatch.setattr(train.LossModel, "forward", forward)
    with pytest.raises(train.TrainingError, match=r"step 3: non-finite loss .* Last good checkpoint: .*step_0000002"):
        train.main(argv(env, 1, out, "--save-every", "2", steps=4))
    ck = out / "checkpoints" / "step_0000002.pt"
    assert train.list_checkpoints(str(out)) == [str(ck)] and torch.load(ck, weights_only=True)["step"] == 2
    assert [r["step"] for r in log_lines(out)] == [1, 2]


def test_full_disk_while_saving_keeps_the_previous_checkpoint(env, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real_save, calls = torch.save, []

    def save(obj, f, *a, **k):
        calls.append(1)
        if len(calls) == 2:  # the second checkpoint: write part of it, then the disk is full
            f.write(b"partial")
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(train.TrainingError, match="could not write checkpoint .*step_0000004.pt.*No space left.*"
                                                  "untouched: step_0000002.pt"):
        train.main(argv(env, 1, out, "--save-every", "2", steps=6))
    assert sorted(os.listdir(out / "checkpoints")) == ["step_0000002.pt"]  # no temporary file left behind
    assert torch.load(out / "checkpoints" / "step_0000002.pt", weights_only=True)["step"] == 2
    monkeypatch.setattr(torch, "save", real_save)
    assert train.main(argv(env, 1, out, "--save-every", "2", "--resume", steps=6))["steps"] == 6


def test_resume_guards(env, tmp_path):
    out = tmp_path / "out"
    train.main(argv(env, 1, out, steps=1))
    with pytest.raises(train.TrainingError, match="already holds checkpoints: pass --resume"):
        train.main(argv(env, 1, out, steps=1))
    with pytest.raises(train.TrainingError, match="different run .*config.*lr: 0.001 -> 0.002"):
        train.main(argv(env, 1, out, "--resume", "--lr", "2e-3", steps=1))


def test_profile_writes_a_trace(env, tmp_path):
    train.main(argv(env, 1, tmp_path / "out", "--profile", steps=4))
    trace = tmp_path / "out" / "profile" / "trace_rank0.json"
    assert trace.exists() and "traceEvents" in json.load(open(trace))


def test_flags_come_from_the_dataclass_and_recipes_fill_defaults():
    cfg = train.resolve(train.parse_args(["--stage", "1", "--model", "m", "--data", "d"]))
    assert (cfg.lr, cfg.global_batch, cfg.template, cfg.projector_lr) == (1e-3, 256, "plain", 1e-3)
    cfg = train.resolve(train.parse_args(["--model", "m", "--data", "d", "--lora", "128"]))
    assert (cfg.stage, cfg.lr, cfg.projector_lr, cfg.lora_alpha, cfg.global_batch, cfg.template) == \
        (2, 2e-4, 2e-5, 256.0, 128, "vicuna_v1")
    assert train.parse_args(["--no-group-by-modality-length"]).group_by_modality_length is False
    with pytest.raises(ValueError, match="--lora is a stage-2 option"):
        train.resolve(train.parse_args(["--stage", "1", "--model", "m", "--data", "d", "--lora", "4"]))

"""demo.py end to end at a toy size: data, tokenizer, layout-C base checkpoint, both train.py stages, evaluation
through generate.py's API, and generate.py's command line answering about a demo image from the saved model."""
import json
import subprocess
import sys
from pathlib import Path

from minillava import demo

ROOT = Path(__file__).resolve().parent.parent


def test_demo_pipeline_runs_and_reports(tmp_path, capsys):
    out = tmp_path / "demo"
    res = demo.main(["--out", str(out), "--n-train", "48", "--n-test", "6", "--stage2-epochs", "1",
                     "--batch", "16", "--examples", "3"])
    printed = capsys.readouterr().out
    # the base checkpoint is an official layout C pair, and the stage-1 projector went into stage 2
    assert (out / "base" / "llama" / "config.json").is_file() and (out / "base" / "clip" / "config.json").is_file()
    assert (out / "stage1" / "mm_projector.safetensors").is_file()
    assert json.loads((out / "stage2" / "config.json").read_text())["model_type"] == "llava"
    # losses are read from train.py's logs: first and last logged step of each stage
    for stage, key in ((1, "stage1_loss"), (2, "stage2_loss")):
        log = [json.loads(line) for line in open(out / f"stage{stage}" / "log.jsonl") if '"loss"' in line]
        assert res[key] == (log[0]["loss"], log[-1]["loss"]) and log[0]["step"] == 1
    test = json.loads((out / "data" / "test.json").read_text())
    assert len(test) == 4 * 6 and set(res["by_kind"]) == {"color", "shape", "count", "position"}
    assert 0.0 <= res["accuracy"] <= 1.0 and 0.0 < res["chance"] < 1.0
    assert f"chance {res['chance']:.1%}" in printed and f"held-out accuracy {res['accuracy']:.1%}" in printed
    assert printed.count("(reference: ") == 3
    assert set(res["quantized"]) == {"int8", "int4"} and all(0.0 <= a <= 1.0 for a in res["quantized"].values())
    assert f"quantized: int8 {res['quantized']['int8']:.1%}, int4 {res['quantized']['int4']:.1%}" in printed
    # and it ends with eval.py run on its held-out images as a POPE and a ScienceQA benchmark
    for name, headline in (("pope", "f1"), ("sqa", "img_accuracy")):
        metrics = json.loads((out / "eval" / name / "metrics.json").read_text())
        assert metrics["benchmark"] == name and metrics["metrics"]["headline"] == res["benchmarks"][name][headline]
        assert f"$ python eval.py run {name} --model {out / 'stage2'}" in printed
        assert f"{name}: {headline} {metrics['metrics']['headline']:.2f}" in printed
        assert len((out / "eval" / name / "answers.jsonl").read_text().splitlines()) == 6
    assert f"POPE F1 {res['benchmarks']['pope']['f1']:.1f}" in printed
    # generate.py answers about a demo image from the saved model (what the demo's last line tells users to run)
    run = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--model", str(out / "stage2"),
                          "--image", str(out / "data" / test[0]["image"]), "--prompt", test[0]["question"],
                          "--max-new-tokens", "4", "--temperature", "0"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "decode" in run.stderr  # the tokens/s summary


def test_demo_trains_the_llava_1_6_way_when_asked(tmp_path, capsys):
    """--image-aspect-ratio anyres: stage 2 writes a llava_next model, and every later step (held-out answers,
    quantized, eval.py's benchmarks) runs on it."""
    out = tmp_path / "demo"
    res = demo.main(["--out", str(out), "--n-train", "16", "--n-test", "2", "--stage2-epochs", "1", "--batch", "16",
                     "--examples", "1", "--image-aspect-ratio", "anyres"])
    printed = capsys.readouterr().out
    config = json.loads((out / "stage2" / "config.json").read_text())
    assert config["model_type"] == "llava_next" and config["image_grid_pinpoints"][0] == [48, 96]
    assert "--image-aspect-ratio anyres" in printed and 0.0 <= res["accuracy"] <= 1.0
    assert len((out / "eval" / "pope" / "answers.jsonl").read_text().splitlines()) == 2

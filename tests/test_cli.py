"""The `mmalign` console command on a tiny trained checkpoint: caption, embed, search (images and audio),
and their errors."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import subprocess
import sys
import time

from mmalign import MultimodalLLM, VisionTextAligner
from mmalign.cli import mmalign
from mmalign.utils import load_checkpoint, save_checkpoint

N_IMAGES = 5
N_CLIPS = 4


@pytest.fixture(scope="module")
def image_dir(tiny_checkpoint) -> Path:
    """Test-split images of the tiny dataset as PNG files (plus a non-image file the listing must skip)."""
    import datasets

    d = tiny_checkpoint / "images"
    if not d.exists():
        d.mkdir()
        test = datasets.load_from_disk(str(tiny_checkpoint / "data/dataset"))["test"]
        for i in range(N_IMAGES):
            test[i]["image"].save(d / f"img{i}.png")
        (d / "notes.txt").write_text("not an image")
    return d


@pytest.fixture(scope="module")
def clip_dir(tiny_checkpoint) -> Path:
    """Test-split clips of the tiny audio dataset: FLAC files as stored, the last one as WAV (plus a non-audio
    file the listing must skip)."""
    import datasets
    import soundfile as sf

    d = tiny_checkpoint / "clips"
    if not d.exists():
        d.mkdir()
        test = datasets.load_from_disk(str(tiny_checkpoint / "data/audio/dataset"))["test"]
        for i in range(N_CLIPS - 1):
            (d / f"clip{i}.flac").write_bytes(test[i]["audio"])
        samples, rate = sf.read(io.BytesIO(test[N_CLIPS - 1]["audio"]))
        sf.write(d / f"clip{N_CLIPS - 1}.wav", samples, rate)
        (d / "notes.txt").write_text("not audio")
    return d


def clips(clip_dir: Path) -> list[Path]:
    return sorted(p for p in clip_dir.iterdir() if p.suffix != ".txt")


def trained_without(modality: str, out: Path, aligner: str | Path = "models/aligner") -> Path:
    """A copy of the aligner as if trained with `modality` off: no adapter, not among its modalities."""
    tensors, cfg = load_checkpoint(aligner)
    cfg = {**cfg, "modalities": [m for m in cfg["modalities"] if m != modality],
           "encoders": {m: e for m, e in cfg["encoders"].items() if m != modality}}
    save_checkpoint(out, {k: v for k, v in tensors.items() if not k.startswith(f"adapters.{modality}.")}, cfg)
    return out


@pytest.fixture
def run(tiny_checkpoint, monkeypatch):
    """Invoke `mmalign ARGS...` from the checkpoint's working dir; returns click's Result."""
    monkeypatch.chdir(tiny_checkpoint)
    runner = CliRunner()
    return lambda *args: runner.invoke(mmalign, [str(a) for a in args], catch_exceptions=False)


def pil_images(paths):
    return [Image.open(p).convert("RGB") for p in paths]


@pytest.mark.parametrize("command, expected", [
    ([], ["caption", "embed", "search"]),
    (["caption"], ["--aligner", "--projector", "--model", "--prompt", "--max-new-tokens", "--batch-size", "--output"]),
    (["export"], ["--out", "--copy-models", "--no-projector"]),
    (["embed"], ["--images", "--audio", "--texts", "--dim", "--output"]),
    (["search"], ["QUERY", "--images", "--audio", "--top-k", "--dim"]),
])
def test_help(run, command, expected):
    result = run(*command, "--help")
    assert result.exit_code == 0, result.output
    assert all(word in result.output for word in expected)


def test_caption_csv_equals_generate(run, image_dir, tiny_checkpoint):
    result = run("caption", image_dir, "--max-new-tokens", 8, "--batch-size", 2, "-o", "out/captions.csv")
    assert result.exit_code == 0, result.output
    rows = pd.read_csv(tiny_checkpoint / "out/captions.csv", keep_default_na=False)
    paths = sorted(image_dir.glob("*.png"))
    assert list(rows["image"]) == [str(p) for p in paths]  # notes.txt is not an image

    mm = MultimodalLLM.from_pretrained("models/projector", VisionTextAligner.from_pretrained("models/aligner"))
    expected = mm.generate(pil_images(paths), prompt=mm.cfg.prompt, max_new_tokens=8)
    assert list(rows["caption"]) == expected and all(expected)

    # jsonl and stdout: the same captions
    result = run("caption", *paths[:2], "--max-new-tokens", 8, "-o", "out/captions.jsonl")
    lines = [json.loads(x) for x in (tiny_checkpoint / "out/captions.jsonl").read_text().splitlines()]
    assert lines == [{"image": str(p), "caption": c} for p, c in zip(paths[:2], expected)]
    result = run("caption", paths[0], "--max-new-tokens", 8)
    assert result.stdout == f"{paths[0]}\t{expected[0]}\n"


def test_caption_prompt_is_passed_to_the_llm(run, image_dir):
    mm = MultimodalLLM.from_pretrained("models/projector", VisionTextAligner.from_pretrained("models/aligner"))
    path = sorted(image_dir.glob("*.png"))[0]
    result = run("caption", path, "--prompt", "What is here?", "--max-new-tokens", 6)
    expected = mm.generate(pil_images([path]), "What is here?", max_new_tokens=6)[0]
    assert result.stdout == f"{path}\t{expected}\n"


def test_embed_images_npy_at_a_matryoshka_dim(run, image_dir, tiny_checkpoint):
    result = run("embed", "--images", image_dir, "--dim", 16, "-o", "out/img16.npy")
    assert result.exit_code == 0, result.output
    z16 = np.load(tiny_checkpoint / "out/img16.npy")
    assert z16.shape == (N_IMAGES, 16) and z16.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(z16, axis=1), 1.0, atol=1e-5)

    # the full embedding is the aligner's; the dim-16 one is its re-normalised prefix
    paths = sorted(image_dir.glob("*.png"))
    run("embed", "--images", paths[0], *paths[1:], "-o", "out/img.npy")  # files given one by one: same order
    z = np.load(tiny_checkpoint / "out/img.npy")
    aligner = VisionTextAligner.from_pretrained("models/aligner").eval()
    with torch.no_grad():
        expected = aligner.encode_images(pil_images(paths)).numpy()
    np.testing.assert_allclose(z, expected, atol=1e-5)
    np.testing.assert_allclose(z16, z[:, :16] / np.linalg.norm(z[:, :16], axis=1, keepdims=True), atol=1e-5)


def test_embed_texts_parquet(run, tiny_checkpoint):
    (tiny_checkpoint / "queries.txt").write_text("a red circle\n\na blue square on the left\n")
    result = run("embed", "--texts", "a small green triangle", "--texts", "queries.txt", "--dim", 8,
                 "-o", "out/texts.parquet")
    assert result.exit_code == 0, result.output
    df = pd.read_parquet(tiny_checkpoint / "out/texts.parquet")
    assert list(df["text"]) == ["a small green triangle", "a red circle", "a blue square on the left"]
    z = np.stack(df["embedding"])
    assert z.shape == (3, 8)
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-5)


def test_search_ranks_images_by_score(run, image_dir, tiny_checkpoint):
    query = "a large red circle in the top left"
    result = run("search", query, "--images", image_dir, "--top-k", 3, "--dim", 16)
    assert result.exit_code == 0, result.output
    hits = [line.split("\t") for line in result.stdout.splitlines()]
    scores, paths = [float(s) for s, _ in hits], [p for _, p in hits]
    assert len(hits) == 3 and scores == sorted(scores, reverse=True)

    # the same ranking as cosine similarity of the embed command's outputs
    run("embed", "--images", image_dir, "--dim", 16, "-o", "out/s.npy")
    run("embed", "--texts", query, "--dim", 16, "-o", "out/q.npy")
    sims = np.load(tiny_checkpoint / "out/s.npy") @ np.load(tiny_checkpoint / "out/q.npy")[0]
    order = np.argsort(-sims)[:3]
    all_paths = sorted(image_dir.glob("*.png"))
    assert paths == [str(all_paths[i]) for i in order]
    np.testing.assert_allclose(scores, sims[order], atol=1e-3)

    result = run("search", query, "--images", image_dir, "--top-k", 50, "-o", "out/hits.csv")  # k > N: all
    assert len(pd.read_csv(tiny_checkpoint / "out/hits.csv")) == N_IMAGES


@pytest.fixture
def bad_inputs(tiny_checkpoint, image_dir, clip_dir) -> Path:
    import soundfile as sf

    d = tiny_checkpoint / "bad"
    if not d.exists():
        (d / "empty").mkdir(parents=True)
        (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
        (d / "broken.wav").write_bytes((clip_dir / f"clip{N_CLIPS - 1}.wav").read_bytes()[:2000])  # cut short
        sf.write(d / "silent.flac", np.zeros(8000), 16000)
        trained_without("audio", d / "image_only", tiny_checkpoint / "models/aligner")
        shutil.copytree(tiny_checkpoint / "models/projector", d / "projector")
        cfg = json.loads((d / "projector/config.json").read_text())
        (d / "projector/config.json").write_text(json.dumps({**cfg, "model_name": "models/builtin/no-such-llm"}))
    return d


@pytest.mark.parametrize("args, message", [
    (["caption", "images", "--aligner", "no/such/dir"], "aligner checkpoint no/such/dir does not exist"),
    (["caption", "images", "--projector", "images"], "projector checkpoint images has no model.safetensors"),
    (["caption", "bad/broken.png"], "cannot read image bad/broken.png"),
    (["caption", "images/missing.png"], "image images/missing.png does not exist"),
    (["caption", "images", "--projector", "bad/projector"],
     "the LLM 'models/builtin/no-such-llm' named in bad/projector/config.json is not a directory"),
    (["caption", "images", "-o", "captions.txt"], "must end in .csv or .jsonl"),
    (["search", "a red circle", "--images", "bad/empty"], "no images in directory bad/empty"),
    (["embed", "--images", "images", "--dim", 33, "-o", "x.npy"], "--dim 33 was not trained"),
    (["caption", "images/img0.png", "bad/broken.png", "--strict"], "cannot read image bad/broken.png"),
    (["embed", "--images", "images", "--texts", "red", "-o", "x.npy"], "give either --images, --audio or --texts"),
    (["embed", "--images", "images", "--audio", "clips", "-o", "x.npy"], "give either --images, --audio or --texts"),
    (["search", "clicks", "--images", "images", "--audio", "clips"], "give either --images or --audio"),
    (["search", "clicks"], "give either --images or --audio"),
    (["embed", "--audio", "bad/empty", "-o", "x.npy"], "no audio files in directory bad/empty (no .wav, .flac"),
    (["caption", "bad/empty"], "no images or audio files in directory bad/empty"),
    (["caption", "clips/missing.wav"], "audio file clips/missing.wav does not exist"),
    (["caption", "clips/clip0.flac", "bad/broken.wav", "--strict"],
     "cannot read audio file bad/broken.wav: truncated audio"),
    (["embed", "--audio", "bad/silent.flac", "-o", "x.npy"], "none of the 1 audio files could be read: "
     "cannot read audio file bad/silent.flac: silent audio"),
    (["embed", "--audio", "clips", "--aligner", "bad/image_only", "-o", "x.npy"],
     "the aligner bad/image_only was trained without audio (it has image only): set `modalities.audio: true` in "
     "params.yaml and run `dvc repro`"),
    (["search", "clicks", "--audio", "clips", "--aligner", "bad/image_only"], "was trained without audio"),
    (["caption", "images/img0.png", "clips/clip0.flac", "--aligner", "bad/image_only"], "was trained without audio"),
    (["embed", "--texts", "missing.txt", "-o", "x.npy"], "text file missing.txt does not exist"),
    (["embed", "--texts", "red", "-o", "x.csv"], "must end in .npy or .parquet"),
])
def test_errors_are_one_clear_line(run, bad_inputs, args, message):
    result = run(*args)
    assert result.exit_code != 0
    assert message in result.output and "Traceback" not in result.output
    assert len([line for line in result.stderr.splitlines() if line.startswith("Error:")]) == 1


def test_unreadable_image_is_skipped_with_a_warning(run, image_dir, bad_inputs, tiny_checkpoint):
    good = sorted(image_dir.glob("*.png"))[:2]
    args = [good[0], "bad/broken.png", good[1]]
    result = run("caption", *args, "--max-new-tokens", 6, "-o", "out/skip.csv")
    assert result.exit_code == 0, result.output
    assert list(pd.read_csv(tiny_checkpoint / "out/skip.csv")["image"]) == [str(p) for p in good]
    assert "skipped 1 unreadable image: bad/broken.png" in result.stderr
    assert "wrote 2 captions" in result.stderr

    result = run("embed", "--images", *args, "--dim", 8, "-o", "out/skip.parquet")
    assert result.exit_code == 0 and "skipped 1 unreadable image" in result.stderr
    assert list(pd.read_parquet(tiny_checkpoint / "out/skip.parquet")["image"]) == [str(p) for p in good]

    result = run("search", "a red circle", *[x for a in args for x in ("--images", a)])
    assert result.exit_code == 0 and "skipped 1 unreadable image" in result.stderr
    assert sorted(line.split("\t")[1] for line in result.stdout.splitlines()) == [str(p) for p in good]


def test_embed_audio_at_a_matryoshka_dim_equals_encode_audio(run, clip_dir, tiny_checkpoint):
    result = run("embed", "--audio", clip_dir, "--dim", 16, "-o", "out/clips16.parquet")
    assert result.exit_code == 0, result.output
    assert f"wrote {N_CLIPS} audio embeddings of size 16" in result.stderr
    df = pd.read_parquet(tiny_checkpoint / "out/clips16.parquet")
    paths = clips(clip_dir)  # .flac and .wav, sorted; notes.txt is not audio
    assert list(df["audio"]) == [str(p) for p in paths]

    # the aligner's embedding of the file bytes, at dim 16 its re-normalised prefix
    aligner = VisionTextAligner.from_pretrained("models/aligner").eval()
    with torch.no_grad():
        z = aligner.encode_audio([p.read_bytes() for p in paths])[:, :16]
    np.testing.assert_allclose(np.stack(df["embedding"]), torch.nn.functional.normalize(z, dim=-1).numpy(), atol=1e-5)


def test_search_ranks_audio_by_score(run, clip_dir, tiny_checkpoint):
    query = "a series of clicks"
    result = run("search", query, "--audio", clip_dir, "--top-k", 2, "--dim", 16, "-o", "out/audio_hits.csv")
    assert result.exit_code == 0, result.output
    assert f"wrote the top 2 of {N_CLIPS} audio files" in result.stderr
    hits = pd.read_csv(tiny_checkpoint / "out/audio_hits.csv")
    assert list(hits.columns) == ["rank", "score", "audio"] and list(hits["rank"]) == [1, 2]

    # the same ranking as cosine similarity of the embed command's outputs
    run("embed", "--audio", clip_dir, "--dim", 16, "-o", "out/a16.npy")
    run("embed", "--texts", query, "--dim", 16, "-o", "out/q16.npy")
    sims = np.load(tiny_checkpoint / "out/a16.npy") @ np.load(tiny_checkpoint / "out/q16.npy")[0]
    order = np.argsort(-sims)[:2]
    assert list(hits["audio"]) == [str(clips(clip_dir)[i]) for i in order]
    np.testing.assert_allclose(hits["score"], sims[order], atol=1e-3)


def test_caption_tells_audio_from_images_by_extension(run, clip_dir, image_dir, tiny_checkpoint):
    sounds, image = clips(clip_dir), sorted(image_dir.glob("*.png"))[0]
    files = [sounds[-1], image, sounds[0]]  # .wav, .png, .flac
    result = run("caption", *files, "--max-new-tokens", 6, "-o", "out/mixed.jsonl")
    assert result.exit_code == 0, result.output
    lines = [json.loads(x) for x in (tiny_checkpoint / "out/mixed.jsonl").read_text().splitlines()]

    mm = MultimodalLLM.from_pretrained("models/projector", VisionTextAligner.from_pretrained("models/aligner"))
    heard = mm.generate([sounds[-1].read_bytes(), sounds[0].read_bytes()], max_new_tokens=6, modality="audio")
    seen = mm.generate(pil_images([image]), max_new_tokens=6)
    assert lines == [{"file": str(f), "caption": c} for f, c in zip(files, [heard[0], seen[0], heard[1]])]

    result = run("caption", sounds[0], "--max-new-tokens", 6, "-o", "out/heard.csv")  # all audio: column audio
    assert pd.read_csv(tiny_checkpoint / "out/heard.csv", keep_default_na=False).to_dict("records") == [
        {"audio": str(sounds[0]), "caption": heard[1]}]
    result = run("caption", sounds[0], "--prompt", "What is here?", "--max-new-tokens", 6)
    assert result.stdout == f"{sounds[0]}\t{mm.generate([sounds[0]], 'What is here?', 6, modality='audio')[0]}\n"


def test_unreadable_audio_is_skipped_with_a_warning(run, clip_dir, bad_inputs, tiny_checkpoint):
    good = clips(clip_dir)[:2]
    args = [good[0], "bad/broken.wav", "bad/silent.flac", good[1]]
    warning = "skipped 2 unreadable audio files: bad/broken.wav, bad/silent.flac"
    result = run("embed", "--audio", *args, "-o", "out/skip_audio.parquet")
    assert result.exit_code == 0 and warning in result.stderr, result.output
    assert list(pd.read_parquet(tiny_checkpoint / "out/skip_audio.parquet")["audio"]) == [str(p) for p in good]

    result = run("search", "clicks", *[x for a in args for x in ("--audio", a)])
    assert result.exit_code == 0 and warning in result.stderr, result.output
    assert sorted(line.split("\t")[1] for line in result.stdout.splitlines()) == [str(p) for p in good]

    result = run("caption", "bad/broken.png", *args, "--max-new-tokens", 4, "-o", "out/skip_mixed.csv")
    assert result.exit_code == 0, result.output
    assert "skipped 3 unreadable files: bad/broken.png, bad/broken.wav, bad/silent.flac" in result.stderr
    assert list(pd.read_csv(tiny_checkpoint / "out/skip_mixed.csv")["file"]) == [str(p) for p in good]


def test_a_directory_stands_for_the_modalities_the_aligner_knows(run, image_dir, clip_dir, bad_inputs,
                                                                 tiny_checkpoint):
    d = tiny_checkpoint / "mixed"
    if not d.exists():
        d.mkdir()
        shutil.copy(image_dir / "img0.png", d)
        shutil.copy(clip_dir / "clip0.flac", d)
    result = run("caption", d, "--max-new-tokens", 4)
    assert [line.split("\t")[0] for line in result.stdout.splitlines()] == [str(d / "clip0.flac"), str(d / "img0.png")]
    result = run("caption", d, "--aligner", "bad/image_only", "--max-new-tokens", 4)  # trained with audio off
    assert result.exit_code == 0, result.output
    assert [line.split("\t")[0] for line in result.stdout.splitlines()] == [str(d / "img0.png")]


@pytest.mark.parametrize("dim", [12, 48])
def test_untrained_dim_is_refused_with_the_trained_dims(run, dim):
    result = run("embed", "--texts", "a red circle", "--dim", dim, "-o", "x.npy")
    assert result.exit_code != 0
    assert f"--dim {dim} was not trained: this aligner's Matryoshka dims are 8, 16, 32" in result.stderr


def test_device_defaults_to_the_best_available(run):
    assert "[default: auto]" in run("caption", "--help").output


@pytest.mark.parametrize("args", [["--help"], ["caption", "--help"], ["embed", "--help"], ["search", "--help"]])
def test_help_is_fast_and_imports_no_torch(args):
    code = ("import sys\nfrom mmalign.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'transformers', 'mlflow', 'pandas') if m in sys.modules]\n"
            "print('heavy:', heavy)")
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True).stdout
    assert time.monotonic() - start < 2.0
    assert "Usage: mmalign" in out and "heavy: []" in out


@pytest.mark.parametrize("copy_models", [False, True])
def test_exported_model_captions_from_another_directory(run, image_dir, clip_dir, tiny_checkpoint, tmp_path,
                                                        monkeypatch, copy_models):
    out = tmp_path / "export"
    result = run("export", "--out", out, *(["--copy-models"] if copy_models else []))
    assert result.exit_code == 0, result.output
    paths = sorted(image_dir.glob("*.png"))[:2]
    mm = MultimodalLLM.from_pretrained("models/projector", VisionTextAligner.from_pretrained("models/aligner"))
    expected = mm.generate(pil_images(paths), prompt=mm.cfg.prompt, max_new_tokens=6)
    clip = clip_dir / "clip0.flac"  # audio: its encoder travels with the export too
    heard = mm.generate([clip], max_new_tokens=6, modality="audio")[0]

    if copy_models:  # the directory stands alone: it still loads once moved
        moved = tmp_path / "moved"
        out.rename(moved)
        out = moved
        assert json.loads((out / "aligner/config.json").read_text())["vision_model_name"] == "models/vision"
        assert json.loads((out / "projector/config.json").read_text())["model_name"] == "models/llm"
        encoders = json.loads((out / "aligner/config.json").read_text())["encoders"]
        assert encoders["audio"]["model_name"] == "models/audio"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = CliRunner().invoke(mmalign, ["caption", *map(str, paths), "--model", str(out), "--max-new-tokens", "6"])
    assert result.exit_code == 0, result.output
    assert result.stdout == "".join(f"{p}\t{c}\n" for p, c in zip(paths, expected))

    import mmalign as package

    loaded = package.from_pretrained(out, device="cpu")  # the Python loader
    assert loaded.generate(pil_images(paths), prompt=loaded.cfg.prompt, max_new_tokens=6) == expected
    if copy_models:
        assert loaded.aligner.cfg.vision_model_name.startswith(str(out)) and loaded.cfg.model_name.startswith(str(out))
    result = CliRunner().invoke(mmalign, ["embed", "--texts", "a red circle", "--model", str(out), "--dim", 8,
                                          "-o", "t.npy"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(mmalign, ["caption", str(clip), "--model", str(out), "--max-new-tokens", "6"])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{clip}\t{heard}\n"


def test_model_option_names_a_directory_that_is_no_export(run, tiny_checkpoint):
    result = run("caption", "images", "--model", "models")
    assert result.exit_code != 0 and "models is not an exported mmalign model" in result.output

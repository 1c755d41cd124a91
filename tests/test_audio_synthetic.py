"""Tests for the synthetic compositional sound scenes (data/synthetic_audio.py)."""

from __future__ import annotations

import numpy as np
import pytest

from mmalign.data.synthetic_audio import (
    ATTRIBUTES, EVENTS, MAX_SECONDS, MIN_SECONDS, _PITCH_HZ, generate_synthetic_audio, heldout_combos)

SR = 16000


@pytest.fixture(scope="module")
def data() -> dict[str, list[dict]]:
    return generate_synthetic_audio(seed=5, n_train=200, n_val=40, n_test=80)


def _combos(clip: dict) -> set[tuple[str, str]]:
    return {(e["event"], e[a]) for e in clip["events"] for a in ATTRIBUTES}


def test_same_seed_gives_identical_clips_and_captions(data):
    again = generate_synthetic_audio(seed=5, n_train=200, n_val=40, n_test=80)
    for split in data:
        for a, b in zip(data[split], again[split], strict=True):
            assert a["id"] == b["id"] and a["captions"] == b["captions"] and a["events"] == b["events"]
            assert a["audio"].tobytes() == b["audio"].tobytes()
    other = generate_synthetic_audio(seed=6, n_train=5, n_val=0, n_test=0)["train"]
    assert any(a["audio"].shape != b["audio"].shape or not np.array_equal(a["audio"], b["audio"])
               for a, b in zip(other, data["train"]))


def test_split_sizes_do_not_change_other_clips(data):
    small = generate_synthetic_audio(seed=5, n_train=10, n_val=0, n_test=3)
    for split, n in (("train", 10), ("test", 3)):
        for a, b in zip(small[split], data[split][:n], strict=True):
            assert np.array_equal(a["audio"], b["audio"]) and a["captions"] == b["captions"]


def test_clips_are_mono_float32_at_the_rate_and_length(data):
    for clip in data["train"] + data["test"]:
        x = clip["audio"]
        assert clip["sampling_rate"] == SR and x.dtype == np.float32 and x.ndim == 1
        assert MIN_SECONDS * SR - 1 <= len(x) <= MAX_SECONDS * SR + 1
        assert np.isfinite(x).all() and np.abs(x).max() <= 1.0
        assert 1 <= len(clip["events"]) <= 3
        assert clip["events"][-1]["offset"] <= len(x) / SR
        onsets = [e["onset"] for e in clip["events"]]
        assert onsets == sorted(onsets)


def test_heldout_combos_absent_from_train_and_val_and_in_every_test_clip(data):
    held = set(heldout_combos(5))
    assert len(held) == 4 and len({e for e, _ in held}) == 4 and len({v for _, v in held}) == 4
    assert heldout_combos(5) == heldout_combos(5) and heldout_combos(5) != heldout_combos(6)
    for clip in data["train"] + data["val"]:
        assert not _combos(clip) & held, clip["id"]
    for clip in data["test"]:
        assert _combos(clip) & held, clip["id"]
    seen = set().union(*(_combos(c) for c in data["train"]))
    assert {e for e, _ in seen} == set(EVENTS)  # every event and every value still trains
    assert {v for _, v in seen} == {v for pair in ATTRIBUTES.values() for v in pair}


def test_captions_are_distinct_and_name_every_event_with_counts(data):
    count_words = {1: "a", 2: "two", 3: "three"}
    for clip in data["train"][:80]:
        caps = clip["captions"]
        assert len(caps) == 4 and len(set(caps)) == 4
        canonical = ", then ".join(f"{count_words[e['count']]} {e['loudness']} {e['pitch']} {e['duration']} "
                                   f"{e['event'] + ('s' if e['count'] > 1 else '')}" for e in clip["events"])
        if "clicks" not in canonical:  # "series of clicks" has its own noun
            assert caps[0] == canonical
    repeats = [c for c in data["train"] if any(e["count"] > 1 for e in c["events"])]
    assert repeats and all(e["duration"] == "short" for c in repeats for e in c["events"] if e["count"] > 1)
    assert any(" two " in f" {c['captions'][0]}" or " three " in f" {c['captions'][0]}" for c in repeats)


def test_pitch_is_audible_in_the_spectrum():
    """A lone beep's spectral peak lies in its pitch's frequency band: the captions describe the sound."""
    clips = generate_synthetic_audio(seed=1, n_train=300, n_val=0, n_test=0)["train"]
    beeps = [c for c in clips if len(c["events"]) == 1 and c["events"][0]["event"] == "beep"]
    assert beeps
    for c in beeps:
        e = c["events"][0]
        x = c["audio"][int(e["onset"] * SR):int(e["offset"] * SR)]
        peak = np.fft.rfftfreq(len(x), 1 / SR)[np.abs(np.fft.rfft(x)).argmax()]
        lo, hi = _PITCH_HZ["beep"][e["pitch"]]
        assert lo - 20 <= peak <= hi + 20, (peak, e)


def test_loudness_words_match_the_peak_level(data):
    for clip in data["train"][:50]:
        for e in clip["events"]:
            peak = np.abs(clip["audio"][int(e["onset"] * SR):int(e["offset"] * SR) + 1]).max()
            assert (peak > 0.3) == (e["loudness"] == "loud"), (peak, e)


@pytest.mark.parametrize("kw", [dict(n_train=-1), dict(captions_per_clip=2), dict(max_events=4),
                                dict(sampling_rate=100), dict(n_test=1.5)])
def test_bad_arguments_name_the_parameter(kw):
    args = dict(seed=0, n_train=1, n_val=1, n_test=1) | kw
    with pytest.raises(ValueError, match=next(iter(kw))):
        generate_synthetic_audio(**args)

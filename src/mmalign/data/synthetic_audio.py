"""Synthetic compositional sound scenes (the offline stand-in for AudioCaps / Clotho).

Each clip (mono float32, ``sampling_rate`` Hz, 2-5 s) holds one to ``max_events`` sound events in
order, on a faint noise floor. An event has a type from ``EVENTS`` (each a distinct synthesis:
a sine beep, a rising chirp, a harmonic hum, a train of clicks, a band-passed noise burst, a
frequency-modulated siren sweep, a damped knock), a pitch (low/high), a loudness (quiet/loud), a
duration (short/long) and a count: short events may repeat two or three times ("two low knocks").

Captions name every event in order with its attributes ("a loud high beep, then two quiet low
knocks"). ``captions[0]`` is canonical (first synonym of every word, "then" between events); the
others are distinct paraphrases: synonyms for every attribute and sound, several templates and
connectors, the attribute words in a different order, and for two events the reversed form
("... after ...").

Compositional generalisation, as synthetic.py does for (colour, shape): ``heldout_combos(seed)``
picks (event, attribute value) combinations, e.g. ("knock", "high"), never present in train or val;
every test clip holds at least one. Every event type and every attribute value still occurs in
training, only the combination is new.

Determinism: every clip has its own ``random.Random`` seeded from (seed, split, index) and a numpy
generator seeded from it, so a clip depends only on those (and ``max_events``, ``sampling_rate``);
split sizes do not change each other's contents.
"""

from __future__ import annotations

import logging
import random
from dataclasses import asdict, dataclass
from numbers import Integral

import numpy as np

logger = logging.getLogger(__name__)

EVENTS: tuple[str, ...] = ("beep", "chirp", "hum", "clicks", "noise burst", "siren sweep", "knock")
ATTRIBUTES: dict[str, tuple[str, str]] = {
    "pitch": ("low", "high"), "loudness": ("quiet", "loud"), "duration": ("short", "long")}
SPLITS: tuple[str, ...] = ("train", "val", "test")
MIN_SECONDS, MAX_SECONDS = 2.0, 5.0
MAX_EVENTS_LIMIT = 3
MIN_CAPTIONS, MAX_CAPTIONS = 3, 20
N_HELDOUT = 4  # of 7 events x 6 attribute values = 42 combinations (~10%)

# Base frequency (Hz) ranges per pitch; each event's synthesis uses it its own way (see _synth).
_PITCH_HZ = {
    "beep": {"low": (350, 500), "high": (1500, 2200)},
    "chirp": {"low": (400, 600), "high": (1800, 2600)},
    "hum": {"low": (80, 120), "high": (250, 350)},
    "clicks": {"low": (600, 900), "high": (3000, 4500)},
    "noise burst": {"low": (300, 500), "high": (2500, 4000)},
    "siren sweep": {"low": (450, 600), "high": (1200, 1600)},
    "knock": {"low": (110, 170), "high": (600, 900)},
}
_PEAK = {"quiet": (0.07, 0.12), "loud": (0.4, 0.6)}
_SECONDS = {"short": (0.15, 0.28), "long": (0.6, 0.9)}  # the longest scene (3 x 3 short) fits in 5 s
_COUNT_WEIGHTS = (3.0, 3.0, 2.0)  # 1, 2, 3 events per clip
_REPEAT_WEIGHTS = (3.0, 1.5, 1.0)  # a short event sounds 1, 2 or 3 times
_NOISE_FLOOR = 0.002  # std of the background noise: no clip is digitally silent

# Caption vocabulary: (singular, plural) per noun; the first entry is canonical.
_NOUNS = {
    "beep": (("beep", "beeps"), ("tone", "tones"), ("bleep", "bleeps")),
    "chirp": (("chirp", "chirps"), ("tweet", "tweets")),
    "hum": (("hum", "hums"), ("drone", "drones")),
    "clicks": (("series of clicks", "series of clicks"), ("clicking sound", "clicking sounds")),
    "noise burst": (("noise burst", "noise bursts"), ("burst of noise", "bursts of noise"), ("hiss", "hisses")),
    "siren sweep": (("siren sweep", "siren sweeps"), ("wailing siren", "wailing sirens")),
    "knock": (("knock", "knocks"), ("thud", "thuds")),
}
_WORDS = {
    "low": ("low", "low-pitched", "deep"), "high": ("high", "high-pitched", "shrill"),
    "quiet": ("quiet", "soft", "faint"), "loud": ("loud", "strong", "powerful"),
    "short": ("short", "brief", "quick"), "long": ("long", "sustained", "drawn-out"),
}
_COUNT_WORDS = ("a", "two", "three")
_CONNECTORS = (", then ", " followed by ", ", and then ", ", after that ")
_TEMPLATES = ("{seq}", "the sound of {seq}", "you can hear {seq}", "a recording of {seq}",
              "{seq} in an otherwise quiet recording", "a clip with {seq}")


@dataclass(frozen=True)
class _Event:
    event: str
    pitch: str
    loudness: str
    duration: str
    count: int
    onset: float = 0.0  # seconds, first sounding
    offset: float = 0.0  # seconds, end of the last repeat

    def combos(self) -> set[tuple[str, str]]:
        return {(self.event, self.pitch), (self.event, self.loudness), (self.event, self.duration)}


def heldout_combos(seed: int) -> list[tuple[str, str]]:
    """(event, attribute value) combinations absent from train/val; every test clip has one.

    N_HELDOUT distinct events, each with a distinct attribute value, so every event and every value
    still appears in training. Sorted, and a function of ``seed`` only.
    """
    rng = random.Random(f"mmalign-synthetic-audio:{seed}:heldout")
    values = [v for pair in ATTRIBUTES.values() for v in pair]
    return sorted(zip(rng.sample(EVENTS, N_HELDOUT), rng.sample(values, N_HELDOUT)))


def generate_synthetic_audio(
    seed: int,
    n_train: int,
    n_val: int,
    n_test: int,
    sampling_rate: int = 16000,
    captions_per_clip: int = 4,
    max_events: int = 3,
) -> dict[str, list[dict]]:
    """Generate the train/val/test splits.

    Returns ``{"train": [...], "val": [...], "test": [...]}``; each clip is ``{"id": "train-00012",
    "audio": np.ndarray (T,) float32 in [-1, 1], "sampling_rate": int, "captions": list[str]
    (captions_per_clip distinct, captions[0] canonical), "events": [{"event", "pitch", "loudness",
    "duration", "count", "onset", "offset"}, ...]}`` in playing order, times in seconds.
    """
    _check_args(n_train, n_val, n_test, sampling_rate, captions_per_clip, max_events)
    held = set(heldout_combos(seed))
    counts = {"train": n_train, "val": n_val, "test": n_test}
    out: dict[str, list[dict]] = {}
    for split in SPLITS:
        clips = []
        for i in range(counts[split]):
            rng = random.Random(f"mmalign-synthetic-audio:{seed}:{split}:{i}")
            events = _sample_scene(rng, max_events, held, forced=sorted(held) if split == "test" else None)
            audio, events = _render(np.random.default_rng(rng.getrandbits(64)), rng, events, sampling_rate)
            clips.append({"id": f"{split}-{i:05d}", "audio": audio, "sampling_rate": sampling_rate,
                          "captions": _captions(rng, events, captions_per_clip),
                          "events": [asdict(e) for e in events]})
        out[split] = clips
    logger.info("synthetic audio: %d train, %d val, %d test clips; held-out combinations %s",
                n_train, n_val, n_test, sorted(held))
    return out


def _check_args(n_train: int, n_val: int, n_test: int, sampling_rate: int, captions_per_clip: int,
                max_events: int) -> None:
    for name, value, lo, hi in (("n_train", n_train, 0, None), ("n_val", n_val, 0, None), ("n_test", n_test, 0, None),
                                ("sampling_rate", sampling_rate, 8000, None),
                                ("captions_per_clip", captions_per_clip, MIN_CAPTIONS, MAX_CAPTIONS),
                                ("max_events", max_events, 1, MAX_EVENTS_LIMIT)):
        allowed = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        if not isinstance(value, Integral) or isinstance(value, bool) or value < lo or (hi is not None and value > hi):
            raise ValueError(f"{name} must be an integer {allowed}, got {value!r}")


def _sample_event(rng: random.Random, event: str | None = None, fixed: tuple[str, str] | None = None) -> _Event:
    """A random event (of type ``event`` if given); ``fixed`` = (attribute, value) pins one attribute."""
    values = {a: rng.choice(v) for a, v in ATTRIBUTES.items()}
    if fixed:
        values[fixed[0]] = fixed[1]
    count = 1 if values["duration"] == "long" else rng.choices((1, 2, 3), weights=_REPEAT_WEIGHTS)[0]
    return _Event(event or rng.choice(EVENTS), count=count, **values)


def _sample_scene(rng: random.Random, max_events: int, held: set[tuple[str, str]],
                  forced: list[tuple[str, str]] | None) -> list[_Event]:
    """Events in playing order; none holds a held-out combination, except the one ``forced`` slot."""
    n = rng.choices(range(1, max_events + 1), weights=_COUNT_WEIGHTS[:max_events])[0]
    forced_index = rng.randrange(n) if forced else -1
    events = []
    for k in range(n):
        if k == forced_index:
            event, value = rng.choice(forced)
            attribute = next(a for a, v in ATTRIBUTES.items() if value in v)
            events.append(_sample_event(rng, event, (attribute, value)))
            continue
        while True:
            e = _sample_event(rng)
            if not e.combos() & held:
                break
        events.append(e)
    return events


def _render(nrng: np.random.Generator, rng: random.Random, events: list[_Event], sr: int
            ) -> tuple[np.ndarray, list[_Event]]:
    """Place the events one after another with gaps -> (clip (T,) float32, events with onset/offset)."""
    sounds = [[_synth(nrng, e, sr) for _ in range(e.count)] for e in events]
    repeat_gaps = [[rng.uniform(0.08, 0.18) for _ in range(e.count - 1)] for e in events]
    event_gaps = [rng.uniform(0.15, 0.45) for _ in range(len(events) - 1)]
    content = (sum(len(s) for ss in sounds for s in ss) / sr + sum(map(sum, repeat_gaps)) + sum(event_gaps))
    lead = rng.uniform(0.05, 0.3)
    seconds = rng.uniform(max(MIN_SECONDS, lead + content + 0.05), MAX_SECONDS)
    # uniform (std _NOISE_FLOOR) rather than Gaussian noise: 5x faster to draw, sounds the same
    clip = nrng.random(int(round(seconds * sr)), dtype=np.float32) - np.float32(0.5)
    clip *= np.float32(_NOISE_FLOOR * 12 ** 0.5)
    t, placed = lead, []
    for k, (e, ss) in enumerate(zip(events, sounds)):
        onset = t
        for j, s in enumerate(ss):
            start = int(round(t * sr))
            clip[start:start + len(s)] += s
            t += len(s) / sr + (repeat_gaps[k][j] if j < len(ss) - 1 else 0.0)
        placed.append(_Event(e.event, e.pitch, e.loudness, e.duration, e.count, round(onset, 3), round(t, 3)))
        t += event_gaps[k] if k < len(events) - 1 else 0.0
    return np.clip(clip, -1.0, 1.0, out=clip), placed


def _synth(nrng: np.random.Generator, e: _Event, sr: int) -> np.ndarray:
    """One sounding of event ``e``, peak-normalised to its loudness: (n,) float64."""
    seconds = nrng.uniform(*_SECONDS[e.duration])
    n = int(seconds * sr)
    t = np.arange(n) / sr
    f = nrng.uniform(*_PITCH_HZ[e.event][e.pitch])
    if e.event == "beep":  # pure tone
        x = np.sin(2 * np.pi * f * t)
    elif e.event == "chirp":  # exponential upward glide over 1.3 octaves
        rate = np.log(2.5) / seconds
        x = np.sin(2 * np.pi * f * np.expm1(rate * t) / rate)
    elif e.event == "hum":  # harmonic-rich tone with a slow tremolo
        x = sum(np.sin(2 * np.pi * k * f * t) / k for k in range(1, 7)) * (1 + 0.2 * np.sin(2 * np.pi * 4 * t))
    elif e.event == "clicks":  # 15-30 clicks a second, each a 3 ms ringing at f
        x = np.zeros(n)
        ring = np.sin(2 * np.pi * f * t[: int(0.003 * sr)]) * np.exp(-t[: int(0.003 * sr)] / 0.001)
        for start in np.arange(0, n - len(ring), int(sr / nrng.uniform(15, 30))):
            x[start:start + len(ring)] += ring
    elif e.event == "noise burst":  # white noise band-passed around f (one octave)
        m = 1 << (n - 1).bit_length()  # a power of two: a fast FFT whatever n is
        spec = np.fft.rfft(nrng.standard_normal(m))
        freqs = np.fft.rfftfreq(m, 1 / sr)
        x = np.fft.irfft(spec * ((freqs > f / np.sqrt(2)) & (freqs < f * np.sqrt(2))), m)[:n]
    elif e.event == "siren sweep":  # frequency swinging +-25% around f, 2-3 times a second
        rate = nrng.uniform(2.0, 3.0)
        x = np.sin(2 * np.pi * f * (t - 0.25 * np.cos(2 * np.pi * rate * t) / (2 * np.pi * rate)))
    elif e.event == "knock":  # struck resonance: decays to 1/e in a fifth of its length, noisy attack
        x = np.sin(2 * np.pi * f * t) * np.exp(-t / (seconds / 5))
        x[: int(0.004 * sr)] += nrng.normal(0, 0.5, int(0.004 * sr))
    else:  # pragma: no cover - EVENTS and this function change together
        raise ValueError(f"unknown event {e.event!r}; allowed: {EVENTS}")
    edge = min(int(0.005 * sr), n // 2)  # 5 ms raised-cosine fade in/out: no clicks at the edges
    fade = 0.5 - 0.5 * np.cos(np.pi * np.arange(edge) / edge)
    x[:edge] *= fade
    x[n - edge:] *= fade[::-1]
    return x * (nrng.uniform(*_PEAK[e.loudness]) / max(np.abs(x).max(), 1e-9))


def _captions(rng: random.Random, events: list[_Event], k: int) -> list[str]:
    """``k`` distinct captions: the canonical one, then random paraphrases."""
    captions = [", then ".join(_phrase(e, [0, 0, 0], 0, ("loudness", "pitch", "duration")) for e in events)]
    for _ in range(200 * k):
        if len(captions) == k:
            return captions
        caption = _random_caption(rng, events)
        if caption not in captions:
            captions.append(caption)
    raise RuntimeError(f"could only build {len(captions)} distinct captions of {k} requested")  # pragma: no cover


def _phrase(e: _Event, word: list[int], noun: int, order: tuple[str, ...]) -> str:
    """"two quiet low short knocks": count, the attribute words in ``order`` (``word`` picks each synonym),
    the noun. Every attribute is always named, so every caption pins the event down fully (all words
    start with a consonant, so the article is always "a")."""
    attrs = {"pitch": e.pitch, "loudness": e.loudness, "duration": e.duration}
    words = [_WORDS[attrs[a]][word[i] % len(_WORDS[attrs[a]])] for i, a in enumerate(order)]
    singular, plural = _NOUNS[e.event][noun % len(_NOUNS[e.event])]
    return f"{_COUNT_WORDS[e.count - 1]} {' '.join(words)} {singular if e.count == 1 else plural}"


def _random_caption(rng: random.Random, events: list[_Event]) -> str:
    order = tuple(rng.sample(list(ATTRIBUTES), 3))
    phrases = [_phrase(e, [rng.randrange(3) for _ in order], rng.randrange(3), order) for e in events]
    if len(phrases) == 2 and rng.random() < 0.25:
        return f"{phrases[1]} after {phrases[0]}"
    if len(phrases) == 3 and rng.random() < 0.25:
        return f"first {phrases[0]}, then {phrases[1]}, and finally {phrases[2]}"
    return rng.choice(_TEMPLATES).format(seq=rng.choice(_CONNECTORS).join(phrases))

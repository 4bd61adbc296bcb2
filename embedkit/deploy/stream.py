"""Real-time genre of a live stream: progressive sources, streaming resampling, sliding windows,
smoothing, hysteresis decisions and change events, on one ``Tagger``.

    source (file blocks | raw PCM on stdin | microphone)
      -> down-mix -> soxr.ResampleStream -> Windower (window k at round(k * hop_s * sr))
      -> bounded queue -> tagger.predict_segments -> calibrate -> Smoother -> Decider -> records

The windows are the ones ``embedkit.audio.segments.segment`` cuts from the same whole signal: the
resampled stream keeps its own sample count and window k starts at round(k * hop_s * sr) of it,
computed from k (never by adding a rounded hop), so nothing drifts over hours; and soxr's
streaming resampler gives the same samples as the one-shot resampling of a whole file.

Memory is bounded: the windower keeps one window plus the unread part of the stream, the queue
between the reader thread and the model holds at most ``StreamConfig.queue`` windows and the
model's side takes at most as many again, and nothing is kept per window after its record is
written (the summary keeps running totals only).

Drop policy (live sources only: stdin, a microphone, a file with ``realtime``): window k is due
at max(its last sample's arrival, stream start + its end time). When the model takes a window
more than ``max_lag_s`` (default: one hop) after it was due, the model is behind real time:
the late windows waiting in the queue are dropped without being tagged, all but the newest; the
records of the windows then tagged say ``"lagging": true``, and the first of them how many
windows were ``dropped`` before it. Smoothing treats the gap as elapsed stream time. A file read as fast as possible (no real time to keep up
with) never drops: the reader waits for the model instead.

    >>> summary = run_stream(tagger, FileSource("song.mp3"), StreamConfig(), print)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
import queue
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

import numpy as np

from ..calibration import UNCERTAIN  # the decision when no genre is clear enough
from ..errors import AudioError, EmbedkitError, StreamError, first_line

#: raw PCM formats accepted on stdin: numpy dtype and bytes per sample.
PCM_FORMATS = {"f32le": ("<f4", 4), "s16le": ("<i2", 2)}
#: sample rates of audio embedkit streams and serves, Hz: 8 kHz telephone audio to 384 kHz
#: studio masters. Outside, an option or a header is wrong, and resampling it would cost memory
#: out of all proportion (--rate 1 -> 16 kHz makes 16,000 samples of each one: 6.5 GB before).
RATE_RANGE = (8000, 384000)
#: most interleaved channels (7.1.4 immersive mixes have 12; 64 leaves room, and bounds a frame)
MAX_CHANNELS = 64
#: f32 samples beyond this are not audio (nominal range is [-1, 1]; 16x headroom for hot
#: masters): bytes of another format read as f32le land far outside it or on NaN.
F32_LIMIT = 16.0
#: leading bytes of containers sometimes piped by mistake instead of raw PCM.
_MAGIC = {
    b"RIFF": "a WAV file",
    b"fLaC": "a FLAC file",
    b"OggS": "an Ogg file",
    b"ID3": "an MP3 file (ID3 tag)",
    b"FORM": "an AIFF file",
    b"\x1aE\xdf\xa3": "a Matroska/WebM file",
}


# --------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class StreamConfig:
    """hop_s: seconds between window starts (one record per hop).
    smooth: "ema:TAU" (exponential moving average, time constant TAU seconds), "last:N" (mean
        of the last N windows) or "none"; over calibrated probabilities.
    enter / exit: a genre becomes the decision when its smoothed probability reaches ``enter``
        and stays the decision while it keeps at least ``exit`` (exit <= enter: hysteresis).
    min_duration_s: a new decision (a genre or ``uncertain``) must hold this long in stream time
        before it is committed, so a short excursion never produces a change event.
    queue: windows buffered between the reader and the model (bounded memory; the model's side
        holds as many again, among which late windows are dropped).
    max_lag_s: lateness tolerated before windows are dropped (live sources); None: one hop.
    batch: most windows tagged in one call when several are waiting.
    """

    hop_s: float = 2.5
    smooth: str = "ema:7.5"
    enter: float = 0.6
    exit: float = 0.4
    min_duration_s: float = 5.0
    queue: int = 8
    max_lag_s: float | None = None
    batch: int = 16

    def __post_init__(self):
        if not self.hop_s > 0:
            raise StreamError(f"hop must be positive, got {self.hop_s}")
        if not (0.0 <= self.exit <= self.enter <= 1.0):
            raise StreamError(f"thresholds need 0 <= exit <= enter <= 1, got enter {self.enter}, exit {self.exit}")
        if self.min_duration_s < 0:
            raise StreamError(f"minimum duration must be >= 0, got {self.min_duration_s}")
        if self.queue < 1 or self.batch < 1:
            raise StreamError("queue and batch must be >= 1")
        if self.max_lag_s is not None and self.max_lag_s < 0:
            raise StreamError(f"max lag must be >= 0, got {self.max_lag_s}")
        parse_smooth(self.smooth)


def parse_smooth(spec: str) -> tuple[str, float]:
    """ "ema:7.5" -> ("ema", 7.5); "last:4" -> ("last", 4); "none" -> ("none", 0)."""
    kind, _, arg = str(spec).partition(":")
    try:
        if kind == "none" and not arg:
            return "none", 0.0
        if kind == "ema" and float(arg) > 0:
            return "ema", float(arg)
        if kind == "last" and int(arg) >= 1 and float(arg) == int(arg):
            return "last", int(arg)
    except ValueError:
        pass
    raise StreamError(f"smoothing {spec!r}: use ema:SECONDS (e.g. ema:7.5), last:N (e.g. last:4) or none")


# --------------------------------------------------------------------------------------------
# sources: iterators of float32 blocks [n, channels] at source.sample_rate


def check_format(rate, channels, where: str) -> None:
    """Refuse (StreamError, one line) a sample rate or channel count no audio has (see
    RATE_RANGE, MAX_CHANNELS): the whole signal path's memory is bounded by them."""
    lo, hi = RATE_RANGE
    if isinstance(rate, bool) or not isinstance(rate, int) or not lo <= rate <= hi:
        raise StreamError(f"{where}: sample rate {rate!r} Hz is outside {lo}..{hi} Hz")
    if isinstance(channels, bool) or not isinstance(channels, int) or not 1 <= channels <= MAX_CHANNELS:
        raise StreamError(f"{where}: {channels!r} channels (1..{MAX_CHANNELS} accepted)")


class Source:
    """A progressive audio source. ``blocks()`` yields float32 [n, channels]; ``live`` says
    whether the audio arrives in real time (then late windows are dropped, see the module doc)."""

    name: str = "<source>"
    sample_rate: int = 0
    channels: int = 1
    live: bool = False

    def blocks(self) -> Iterator[np.ndarray]:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        """Release the source; called by the thread that iterates ``blocks()``, at its end."""

    def interrupt(self) -> None:
        """Wake a reader waiting inside ``blocks()`` (called from another thread on stop)."""


class FileSource(Source):
    """An audio file read block by block with soundfile (what libsndfile decodes: WAV, FLAC,
    Ogg, MP3...). realtime: pace the blocks at 1x, as if the file were playing live."""

    def __init__(
        self,
        path: str | os.PathLike,
        realtime: bool = False,
        block_frames: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        from ..audio.decoding import open_audio

        p = Path(path)
        self._fh = open_audio(p)
        self.name = str(p)
        self.sample_rate = int(self._fh.samplerate)
        self.channels = int(self._fh.channels)
        try:
            check_format(self.sample_rate, self.channels, self.name)
        except StreamError:
            self._fh.close()
            raise
        self.live = realtime
        # Small blocks when paced (a sample waits at most one block to be delivered), large ones
        # when reading as fast as possible (fewer Python round trips).
        self.block_frames = block_frames or (1024 if realtime else 65536)
        self._clock, self._sleep = clock, sleep

    def blocks(self) -> Iterator[np.ndarray]:
        t0, done = self._clock(), 0
        while True:
            try:
                data = self._fh.read(self.block_frames, dtype="float32", always_2d=True)
            except Exception as exc:
                raise AudioError(
                    self.name, f"cannot decode audio after {done / self.sample_rate:.2f} s ({exc})"
                ) from None
            if len(data) == 0:
                return
            if not np.isfinite(data).all():
                raise AudioError(self.name, f"contains NaN or infinite samples near {done / self.sample_rate:.2f} s")
            done += len(data)
            if self.live:  # deliver each block when its last sample would have played
                wait = t0 + done / self.sample_rate - self._clock()
                if wait > 0:
                    self._sleep(wait)
            yield data

    def close(self) -> None:
        self._fh.close()


class PcmSource(Source):
    """Raw interleaved little-endian PCM from a binary stream (stdin): f32le or s16le.

    Reads whatever is available (``read1``), keeps a partial frame for the next read, and raises
    StreamError naming the problem for a stream that ends inside a frame, container bytes (WAV,
    FLAC, MP3...) or text piped instead of raw PCM, and f32 values that cannot be audio.
    """

    def __init__(
        self,
        fh: BinaryIO,
        fmt: str = "f32le",
        rate: int = 44100,
        channels: int = 1,
        name: str = "<stdin>",
        live: bool = True,
        read_bytes: int = 1 << 16,
    ):
        if fmt not in PCM_FORMATS:
            raise StreamError(f"--format {fmt!r}: raw PCM must be one of {', '.join(PCM_FORMATS)}")
        if isinstance(rate, bool) or not isinstance(rate, int) or not RATE_RANGE[0] <= rate <= RATE_RANGE[1]:
            raise StreamError(f"--rate must be {RATE_RANGE[0]}..{RATE_RANGE[1]} Hz, got {rate!r}")
        if isinstance(channels, bool) or not isinstance(channels, int) or not 1 <= channels <= MAX_CHANNELS:
            raise StreamError(f"--channels must be between 1 and {MAX_CHANNELS}, got {channels!r}")
        self._fh, self.fmt, self.sample_rate, self.channels, self.name, self.live = fh, fmt, rate, channels, name, live
        self._dtype, width = PCM_FORMATS[fmt]
        self.frame_bytes = width * channels
        self._read_bytes = max(self.frame_bytes, read_bytes - read_bytes % self.frame_bytes)

    def _read(self) -> bytes:
        read1 = getattr(self._fh, "read1", None)
        return read1(self._read_bytes) if read1 is not None else self._fh.read(self._read_bytes)

    def _fileno(self) -> int | None:
        fd = getattr(self._fh, "fd", None)
        if fd is None:
            try:
                fd = self._fh.fileno()
            except (AttributeError, OSError, ValueError):
                return None
        return fd

    def blocks(self) -> Iterator[np.ndarray]:
        pending, frames, first = b"", 0, True
        writers: list = []
        while True:
            chunk = self._read()
            if not chunk:
                break
            if first:
                # The writers of a pipe, while they write: at the end, whether one was killed.
                fd = self._fileno()
                writers = pipe_writers(fd) if fd is not None else []
                # Enough bytes to recognise a container or text (a pipe may deliver a few first).
                while len(chunk) < 64:
                    more = self._read()
                    if not more:
                        break
                    chunk += more
                self._check_start(chunk)
                first = False
            buf = pending + chunk if pending else chunk
            usable = len(buf) - len(buf) % self.frame_bytes
            pending = buf[usable:]
            if not usable:
                continue
            x = np.frombuffer(buf[:usable], dtype=self._dtype).reshape(-1, self.channels)
            if self.fmt == "s16le":
                x = x.astype(np.float32) / np.float32(32768.0)
            else:
                x = x.astype(np.float32)  # native-endian copy
                bad = ~np.isfinite(x) | (np.abs(x) > F32_LIMIT)
                if bad.any():
                    i = int(np.argmax(bad.any(axis=1)))
                    raise StreamError(
                        f"{self.name}: not {self.channels}-channel f32le audio near {(frames + i) / self.sample_rate:.2f} s "
                        f"(sample {x[i][bad[i]][0]:.3g}); check --format/--channels, or that the bytes are raw PCM"
                    )
            frames += len(x)
            yield x
        why = ended_abnormally(writers)
        if why:
            raise StreamError(
                f"{self.name}: the input ended abnormally: {why} after {frames / self.sample_rate:.2f} s of audio "
                "(processed); not a normal end of stream"
            )
        if pending:
            raise StreamError(
                f"{self.name}: stream ended inside a frame ({len(pending)} trailing bytes; a {self.fmt} frame of {self.channels} channel(s) "
                f"is {self.frame_bytes} bytes); the {frames / self.sample_rate:.2f} s before it were processed"
            )

    def _check_start(self, head: bytes) -> None:
        # Containers by their signature, text by its bytes. (A bare MP3 frame sync is not
        # checked: 0xFFEx is also an ordinary int16 / float32 byte pair.) What passes here and
        # is still not PCM shows as out-of-range values in f32le; s16le takes any bytes.
        for magic, what in _MAGIC.items():
            if head.startswith(magic):
                raise StreamError(
                    f"{self.name}: holds {what}, not raw PCM; pass the file path instead of '-', or decode it with ffmpeg -f {self.fmt}"
                )
        sample = head[:4096]
        if len(sample) >= 64 and all(b in b"\t\n\r" or 32 <= b < 127 for b in sample):
            raise StreamError(f"{self.name}: is text, not raw {self.fmt} audio")


class _ProcStat:
    """Fields of /proc/PID/stat: the command name, state, start time (clock ticks after boot)
    and exit code (a waitpid status, set as the process exits; Linux >= 3.5)."""

    def __init__(self, pid: int):
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read().decode("utf-8", "replace")
        self.comm = raw[raw.index("(") + 1 : raw.rindex(")")]
        rest = raw[raw.rindex(")") + 2 :].split()
        self.state, self.start = rest[0], rest[19]
        self.exit_code = int(rest[49]) if len(rest) > 49 else 0


def pipe_writers(fd: int) -> list[tuple[int, str, str]]:
    """(pid, start time, command) of the other processes that hold the pipe ``fd`` reads
    open for writing: the program piping audio in (ffmpeg). Linux /proc; [] elsewhere, for a
    non-pipe, or for processes of other users."""
    import stat

    try:
        st = os.fstat(fd)
    except OSError:
        return []
    if not stat.S_ISFIFO(st.st_mode) or not os.path.isdir("/proc/self/fd"):
        return []
    me, found = os.getpid(), []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            fds = os.listdir(f"/proc/{name}/fd")
        except OSError:
            continue
        for f in fds:
            try:
                other = os.stat(f"/proc/{name}/fd/{f}")
                if (other.st_ino, other.st_dev) != (st.st_ino, st.st_dev):
                    continue
                with open(f"/proc/{name}/fdinfo/{f}") as fh:
                    flags = int(fh.read().split("flags:")[1].split()[0], 8)
                if flags & os.O_ACCMODE == os.O_RDONLY:
                    continue
                info = _ProcStat(int(name))
            except (OSError, ValueError, IndexError):
                continue
            found.append((int(name), info.start, info.comm))
            break
    return found


def ended_abnormally(writers: list[tuple[int, str, str]]) -> str | None:
    """Why the pipe's writers ended, when one was killed by a signal or exited with a failure
    status; None when they ended normally or can no longer be seen. Read at end of stream: the
    kernel sets a process's exit code before it closes its files, so a writer whose closing
    ended the stream still shows it until its parent reaps it (a shell may reap first: then
    nothing is known and the end counts as normal)."""
    import signal

    for pid, start, comm in writers:
        try:
            info = _ProcStat(pid)
        except (OSError, ValueError, IndexError):
            continue  # reaped
        if info.start != start or info.exit_code == 0:
            continue
        sig, status = info.exit_code & 0x7F, (info.exit_code >> 8) & 0xFF
        if sig:
            try:
                name = signal.Signals(sig).name
            except ValueError:
                name = f"signal {sig}"
            return f"the program writing it ({comm}, pid {pid}) was killed by {name}"
        return f"the program writing it ({comm}, pid {pid}) failed with exit status {status}"
    return None


class MicSource(Source):
    """A microphone / system input through sounddevice (``pip install 'embedkit[live]'``).

    The audio callback only copies blocks into a bounded queue (``buffer_s`` seconds); if the
    reader ever falls that far behind, blocks are dropped and counted in ``overflows``.
    """

    live = True

    def __init__(
        self,
        device: str | int | None = None,
        rate: int | None = None,
        channels: int = 1,
        block_frames: int = 1024,
        buffer_s: float = 30.0,
    ):
        from ..errors import require

        try:
            self._sd = require("sounddevice", "pip install 'embedkit[live]'", "microphone input")
        except OSError as exc:  # the package is there but not the PortAudio library it wraps
            raise StreamError(
                f"sounddevice cannot load PortAudio ({exc}); install it (Debian/Ubuntu: apt install libportaudio2)"
            ) from None
        try:
            info = self._sd.query_devices(device, "input")
        except Exception as exc:
            raise StreamError(f"input device {device!r}: {exc}") from None
        self.sample_rate = int(rate or info["default_samplerate"])
        self.channels = int(channels)
        self.name = f"mic:{info['name']}"
        check_format(self.sample_rate, self.channels, self.name)
        self._device, self.block_frames = device, block_frames
        self._q: queue.Queue = queue.Queue(maxsize=max(2, int(buffer_s * self.sample_rate / block_frames)))
        self.overflows = 0
        self._stream = None

    def _callback(self, indata, frames, time_info, status):  # runs on the audio thread
        try:
            self._q.put_nowait(np.array(indata, dtype=np.float32, copy=True))
        except queue.Full:
            self.overflows += 1

    def blocks(self) -> Iterator[np.ndarray]:
        try:
            self._stream = self._sd.InputStream(
                device=self._device,
                samplerate=self.sample_rate,
                channels=self.channels,
                dtype="float32",
                blocksize=self.block_frames,
                callback=self._callback,
            )
            self._stream.start()
        except Exception as exc:
            raise StreamError(f"{self.name}: cannot open the input ({exc})") from None
        while True:
            block = self._q.get()
            if block is None:
                return
            yield block

    def close(self) -> None:
        if self._stream is not None:
            self._stream.stop()
            self._stream.close()
            self._stream = None

    def interrupt(self) -> None:
        try:
            self._q.put_nowait(None)
        except queue.Full:  # the reader is not waiting then
            pass


class _FdReader:
    """Unbuffered reads of a file descriptor. The reader thread must not hold the lock of
    sys.stdin's buffer: a daemon thread blocked there aborts interpreter shutdown (Ctrl-C)."""

    def __init__(self, fd: int):
        self.fd = fd

    def read1(self, n: int) -> bytes:
        return os.read(self.fd, n)


def _stdin():
    try:
        return _FdReader(sys.stdin.fileno())
    except (AttributeError, OSError, ValueError):  # a replaced sys.stdin (tests, embedding)
        return sys.stdin.buffer


def open_source(
    source: str,
    fmt: str | None = None,
    rate: int | None = None,
    channels: int | None = None,
    realtime: bool = False,
    stdin: BinaryIO | None = None,
) -> Source:
    """SOURCE as the CLI names it: '-' raw PCM on stdin, 'mic' or 'mic:DEVICE' an input device,
    anything else an audio file. --format/--rate/--channels describe stdin (rate and channels
    also choose the microphone's); a file describes itself."""
    if source == "-":
        if realtime:
            raise StreamError("--realtime paces a file; stdin arrives at its own pace")
        if stdin is None and sys.stdin is not None and sys.stdin.isatty():
            raise StreamError(
                "stdin is a terminal, not audio: pipe raw PCM into it, e.g. ffmpeg -i URL -f f32le -ac 1 -ar 44100 - | embedkit stream RUN - --rate 44100"
            )
        fh = stdin if stdin is not None else _stdin()
        return PcmSource(fh, fmt or "f32le", 44100 if rate is None else rate, 1 if channels is None else channels)
    if source == "mic" or source.startswith("mic:"):
        if fmt is not None or realtime:
            raise StreamError("--format and --realtime do not apply to a microphone")
        dev = source[4:] or None
        return MicSource(int(dev) if dev and dev.isdigit() else dev, rate, channels or 1)
    if fmt is not None or rate is not None or channels is not None:
        raise StreamError(
            f"--format/--rate/--channels describe raw PCM on stdin ('-'); {source} is read with its own format"
        )
    return FileSource(source, realtime=realtime)


# --------------------------------------------------------------------------------------------
# signal path: down-mix -> streaming resampler -> windows


class Resampler:
    """Streaming band-limited resampling (soxr HQ, as ``embedkit.audio.decoding.resample``); the
    concatenated output equals the one-shot resampling of the whole signal."""

    def __init__(self, sr_in: int, sr_out: int):
        self.identity = sr_in == sr_out
        if not self.identity:
            import soxr

            self._rs = soxr.ResampleStream(sr_in, sr_out, 1, dtype="float32", quality="HQ")

    def push(self, y: np.ndarray, last: bool = False) -> np.ndarray:
        if self.identity:
            return y
        return self._rs.resample_chunk(np.ascontiguousarray(y, dtype=np.float32), last=last)


class Windower:
    """Cuts a sample stream into the windows ``embedkit.audio.segments.segment`` cuts from the whole
    signal: window k covers [round(k * hop_s * sr), + round(segment_s * sr)) of the stream's own
    sample count. Keeps only the samples a future window still needs."""

    def __init__(self, sr: int, segment_s: float, hop_s: float):
        from ..audio.segments import _check

        self.length = _check(sr, segment_s, hop_s)
        self.sr, self.hop_s = sr, hop_s
        self.k = 0  # next window
        self.n = 0  # samples received
        self._buf = np.zeros(0, dtype=np.float32)
        self._buf0 = 0  # stream index of _buf[0]

    def start(self, k: int) -> int:
        # The expression of segments.window_starts (float64 k * hop_s * sr, round half to even).
        return int(np.round(np.float64(k) * self.hop_s * self.sr))

    def push(self, y: np.ndarray) -> list[tuple[int, int, np.ndarray]]:
        """Append samples; return (k, start sample, window float32 [length]) for each window
        completed."""
        y = np.asarray(y, dtype=np.float32)
        self._buf = np.concatenate([self._buf, y]) if len(self._buf) else y.copy()
        self.n += len(y)
        out = []
        s = self.start(self.k)
        while s + self.length <= self.n:
            i = s - self._buf0
            out.append((self.k, s, self._buf[i : i + self.length].copy()))
            self.k += 1
            s = self.start(self.k)
        # Drop what no future window needs (a hop longer than the window skips samples).
        keep_from = min(s, self.n)
        if keep_from > self._buf0:
            self._buf = self._buf[keep_from - self._buf0 :]
            self._buf0 = keep_from
        return out


# --------------------------------------------------------------------------------------------
# smoothing and decisions


class Smoother:
    """Smoothed probabilities [C] from calibrated window probabilities [C].

    ema:TAU: s <- s + a * (p - s) with a = 1 - exp(-dt / TAU), dt the stream time since the
    previous tagged window (dropped windows make dt larger, not the memory shorter).
    last:N: mean of the last N tagged windows. none: p itself."""

    def __init__(self, spec: str):
        self.kind, self.arg = parse_smooth(spec)
        self._s: np.ndarray | None = None
        self._last: deque = deque(maxlen=int(self.arg) if self.kind == "last" else 1)

    def update(self, p: np.ndarray, dt: float) -> np.ndarray:
        p = np.asarray(p, dtype=np.float64)
        if self.kind == "ema":
            if self._s is None:
                self._s = p.copy()
            else:
                self._s += (1.0 - math.exp(-dt / self.arg)) * (p - self._s)
            return self._s.copy()
        if self.kind == "last":
            self._last.append(p)
            return np.mean(self._last, axis=0)
        return p.copy()


class Decider:
    """Hysteresis over smoothed probabilities: the proposed decision is the current genre while
    it keeps >= exit (unless another genre leads with >= enter), else the leading genre if it
    reaches enter, else ``uncertain``. A proposal different from the decision becomes the
    decision once it has been proposed continuously for min_duration_s of stream time."""

    def __init__(self, labels: list[str], enter: float, exit: float, min_duration_s: float):
        self.labels, self.enter, self.exit, self.min_duration_s = list(labels), enter, exit, min_duration_s
        self.state = UNCERTAIN
        self._pending: str | None = None
        self._pending_since = 0.0

    def propose(self, s: np.ndarray) -> str:
        top = int(np.argmax(s))
        if self.state != UNCERTAIN:
            cur = s[self.labels.index(self.state)]
            if cur >= self.exit and not (self.labels[top] != self.state and s[top] >= self.enter):
                return self.state
        return self.labels[top] if s[top] >= self.enter else UNCERTAIN

    def update(self, s: np.ndarray, t: float) -> dict | None:
        """Smoothed probabilities at stream time t -> the change event, or None."""
        proposal = self.propose(s)
        if proposal == self.state:
            self._pending = None
            return None
        if proposal != self._pending:
            self._pending, self._pending_since = proposal, t
        if t - self._pending_since + 1e-9 >= self.min_duration_s:
            change = {"from": self.state, "to": proposal, "since_s": round(self._pending_since, 3)}
            self.state, self._pending = proposal, None
            return change
        return None


# --------------------------------------------------------------------------------------------
# the loop


@dataclass
class _Window:
    k: int
    start: int  # sample index at the tagger's rate
    frame: np.ndarray
    arrival: float  # wall time its last sample reached us


_END = object()


def _reader(
    source: Source, sr: int, windower: Windower, q: queue.Queue, stop: threading.Event, clock, stats: dict
) -> None:
    """Source -> windows on q; then _END, or the exception that stopped it."""

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:  # the model is behind: wait (and see whether we should stop)
                pass
        return False

    try:
        from ..audio.decoding import _downmix

        rs = Resampler(source.sample_rate, sr)
        for block in source.blocks():
            now = clock()
            if stats["t0"] is None:
                stats["t0"] = now - len(block) / source.sample_rate
            stats["frames_in"] += len(block)
            for k, start, frame in windower.push(rs.push(_downmix(block))):
                if not put(_Window(k, start, frame, now)):
                    return
            if stop.is_set():
                return
        now = clock()
        for k, start, frame in windower.push(rs.push(np.zeros(0, np.float32), last=True)):
            if not put(_Window(k, start, frame, now)):
                return
        put(_END)
    except BaseException as exc:  # handed to the consumer, which raises it after the earlier windows
        put(exc)
    finally:
        source.close()


def _probs(labels: list[str], p: np.ndarray) -> dict[str, float]:
    return {l: round(float(v), 6) for l, v in zip(labels, p)}


def run_stream(
    tagger,
    source: Source,
    cfg: StreamConfig,
    emit: Callable[[dict], None],
    clock: Callable[[], float] = time.monotonic,
    rule=None,
) -> dict:
    """Tag ``source`` window by window; call ``emit(record)`` once per tagged window and once
    with the final summary, which is also returned.

    Window record: {"type": "window", "k", "start_s", "end_s", "time_s" (= end_s, stream time),
    "raw" {label: calibrated window probability}, "smoothed" {label: p}, "decision",
    "change" ({"from", "to", "since_s"} or null), "lagging", "dropped" (windows dropped since
    the previous record), "delay_ms" (wall time from the window's last sample arriving to its
    record), "window" ({"decision", "genres", "confidence"}: the one decision,
    ``embedkit.calibration.decide``, of this window's calibrated probabilities under ``rule``,
    what ``embedkit tag`` decides for a track with these probabilities)}. Summary: {"type": "summary", "end" ("eof" | "interrupted" | "broken pipe" |
    "error"), "error", "audio_s", "windows", "dropped", "changes", "share" {decision: fraction of
    the decided stream time}, "seconds" {decision: s}, "final_decision", "wall_s", "compute_s",
    "realtime_factor" (audio_s / wall_s), "max_delay_ms", "rule" (the rule of the window
    decisions)}. rule: ``embedkit.calibration.DecisionRule`` (default: the model's).

    Errors of the source (malformed input) are raised after the summary is emitted, so the
    windows before the error are not lost. KeyboardInterrupt and a broken pipe on ``emit`` end
    the stream cleanly with the summary's "end" saying why.
    """
    from .records import decision_json

    labels = list(tagger.labels)
    rule = rule or tagger.rule
    sr = int(tagger.sample_rate)
    windower = Windower(sr, tagger.segment.segment_s, cfg.hop_s)
    smoother = Smoother(cfg.smooth)
    decider = Decider(labels, cfg.enter, cfg.exit, cfg.min_duration_s)
    max_lag = cfg.hop_s if cfg.max_lag_s is None else cfg.max_lag_s
    q: queue.Queue = queue.Queue(maxsize=cfg.queue)
    stop = threading.Event()
    stats: dict[str, Any] = {"t0": None, "frames_in": 0}
    reader = threading.Thread(
        target=_reader, args=(source, sr, windower, q, stop, clock, stats), name="embedkit-stream-reader", daemon=True
    )
    seconds: dict[str, float] = {}
    n_windows = n_dropped = n_changes = 0
    dropped_since = 0
    prev_end: float | None = None
    compute_s, max_delay = 0.0, 0.0
    end, error = "eof", None
    t_wall = clock()
    reader.start()
    pending: deque[_Window] = deque()  # taken from the queue, not yet tagged (at most cfg.queue)
    done = False

    def take(item) -> None:
        nonlocal done, error
        if item is _END:
            done = True
        elif isinstance(item, BaseException):
            error, done = item, True
        else:
            pending.append(item)

    try:
        while pending or not done:
            if not pending:
                try:
                    take(q.get(timeout=0.1))
                except queue.Empty:
                    continue
            while not done and len(pending) < cfg.queue:  # what else is waiting, bounded
                try:
                    take(q.get_nowait())
                except queue.Empty:
                    break
            if not pending:
                continue
            lag = False
            if source.live:
                now = clock()
                t0 = stats["t0"]
                late = [now - max(w.arrival, t0 + (w.start + windower.length) / sr) > max_lag for w in pending]
                # Late windows form a prefix (later windows are due later): drop all but the newest.
                n_late = sum(late)
                if n_late:
                    drop = min(n_late, len(pending) - 1)
                    for _ in range(drop):
                        pending.popleft()
                    n_dropped += drop
                    dropped_since += drop
                    lag = True  # behind real time: what is tagged now comes late, or after a gap
            batch = [pending.popleft() for _ in range(min(cfg.batch, len(pending)))]
            lagging = [lag] * len(batch)
            t = clock()
            p, nm = tagger.score_segments(np.stack([w.frame for w in batch]))
            p = np.asarray(p, dtype=np.float64)
            nm = [None] * len(batch) if nm is None else [float(v) for v in nm]  # per window: not-music score
            pc = tagger.calibrate(p)
            compute_s += clock() - t
            for w, praw, lag, w_nm in zip(batch, pc, lagging, nm):
                start_s = w.start / sr
                end_s = (w.start + windower.length) / sr
                dt = cfg.hop_s if prev_end is None else end_s - prev_end
                s = smoother.update(praw, dt)
                change = decider.update(s, end_s)
                # Stream time since the previous record is credited to the decision now held.
                seconds[decider.state] = seconds.get(decider.state, 0.0) + (
                    end_s - prev_end if prev_end is not None else 0.0
                )
                prev_end = end_s
                n_windows += 1
                n_changes += change is not None
                delay = clock() - w.arrival
                max_delay = max(max_delay, delay)
                emit(
                    {
                        "type": "window",
                        "k": w.k,
                        "start_s": round(start_s, 6),
                        "end_s": round(end_s, 6),
                        "time_s": round(end_s, 6),
                        "raw": _probs(labels, praw),
                        "smoothed": _probs(labels, s),
                        "decision": decider.state,
                        "change": change,
                        "window": {
                            k: v for k, v in decision_json(tagger.decide(praw, rule, w_nm), rule).items() if k != "rule"
                        },
                        "lagging": bool(lag),
                        "dropped": dropped_since,
                        "delay_ms": round(delay * 1e3, 1),
                    }
                )
                dropped_since = 0
    except KeyboardInterrupt:
        end = "interrupted"
    except BrokenPipeError:
        end = "broken pipe"
    finally:
        stop.set()
        source.interrupt()
        reader.join(timeout=1.0)  # a reader blocked on a silent pipe is a daemon: left behind
    if error is not None:
        end = "error"
    total = sum(seconds.values())
    audio_s = stats["frames_in"] / source.sample_rate if source.sample_rate else 0.0
    wall = clock() - t_wall
    summary = {
        "type": "summary",
        "end": end,
        "error": None if error is None else str(error),
        "source": source.name,
        "audio_s": round(audio_s, 3),
        "windows": n_windows,
        "dropped": n_dropped,
        "changes": n_changes,
        "share": {k: round(v / total, 4) for k, v in sorted(seconds.items(), key=lambda kv: -kv[1])}
        if total > 0
        else {},
        "seconds": {k: round(v, 3) for k, v in sorted(seconds.items(), key=lambda kv: -kv[1])},
        "final_decision": decider.state,
        "wall_s": round(wall, 3),
        "compute_s": round(compute_s, 3),
        "realtime_factor": round(audio_s / wall, 2) if wall > 0 else None,
        "max_delay_ms": round(max_delay * 1e3, 1),
        "rule": rule.to_dict(),
    }
    if getattr(source, "overflows", 0):
        summary["input_overflows"] = source.overflows
    summary["device"] = str(getattr(tagger, "device", "cpu"))
    if end != "broken pipe":
        try:
            emit(summary)
        except BrokenPipeError:
            summary["end"] = "broken pipe"
    if error is not None:
        if isinstance(error, EmbedkitError):
            raise error
        if isinstance(error, KeyboardInterrupt):
            summary["end"] = "interrupted"
            return summary
        raise StreamError(f"{source.name}: {first_line(error, with_type=True)}") from error
    return summary


# --------------------------------------------------------------------------------------------
# output


class JsonLinesWriter:
    """emit(record) -> one JSON object per line on ``fh``, flushed (consumers see each hop
    live). A closed pipe raises BrokenPipeError, which run_stream turns into a clean stop."""

    def __init__(self, fh=None):
        self.fh = fh if fh is not None else sys.stdout

    def __call__(self, record: dict) -> None:
        self.fh.write(json.dumps(record, separators=(",", ":")) + "\n")
        self.fh.flush()


class LiveView:
    """A rich live display of the records on a terminal: the decision, the smoothed
    probabilities as bars, stream time, lag and the last changes."""

    def __init__(self, console=None, top: int = 6):
        from rich.console import Console

        self.console = console or Console()
        self.top = top
        self._changes: deque = deque(maxlen=5)
        self._live = None
        self.summary: dict | None = None

    def render(self, rec: dict):
        from rich.table import Table
        from rich.text import Text

        if rec.get("type") == "summary":
            from rich.console import Group

            t = Table(show_header=True)
            t.add_column("decision")
            t.add_column("share", justify="right")
            for k, v in rec["share"].items():
                t.add_row(k, f"{v:.1%}")
            head = Text(
                f"stream ended ({rec['end']}): {rec['audio_s']:.1f} s, {rec['windows']} windows, {rec['changes']} changes",
                style="bold",
            )
            return Group(head, t)
        if rec.get("change"):
            self._changes.appendleft(f"{_clock_str(rec['time_s'])}  {rec['change']['from']} -> {rec['change']['to']}")
        t = Table(
            title=f"{_clock_str(rec['time_s'])}  [bold]{rec['decision']}[/]"
            + ("  [red]lagging[/]" if rec["lagging"] else ""),
            show_header=False,
            box=None,
        )
        t.add_column("genre", width=14)
        t.add_column("bar", width=40)
        t.add_column("p", justify="right")
        for label, p in sorted(rec["smoothed"].items(), key=lambda kv: -kv[1])[: self.top]:
            bar = Text("█" * int(round(p * 40)), style="green" if label == rec["decision"] else "cyan")
            t.add_row(label, bar, f"{p:.2f}")
        for c in self._changes:
            t.add_row("", Text(c, style="dim"), "")
        return t

    def __call__(self, rec: dict) -> None:
        from rich.live import Live

        if rec.get("type") == "summary":
            self.summary = rec
            self.close()
            self.console.print(self.render(rec))
            return
        if self._live is None:
            self._live = Live(self.render(rec), console=self.console, auto_refresh=False, transient=False)
            self._live.start()
        else:
            self._live.update(self.render(rec), refresh=True)

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None


def _clock_str(t: float) -> str:
    m, s = divmod(t, 60)
    h, m = divmod(int(m), 60)
    return f"{h:d}:{m:02d}:{s:04.1f}"


# --------------------------------------------------------------------------------------------
# the command's one call


def load_model(
    model: str | os.PathLike,
    checkpoint: str | None = None,
    device: str | None = "cpu",
    precision: str = "fp32",
    allow_tf32: bool = False,
):
    """A run directory or model file -> its Tagger (``embedkit.deploy.tagger.load_tagger``) on ``device``."""
    from .tagger import load_tagger

    return load_tagger(model, checkpoint=checkpoint, device=device, precision=precision, allow_tf32=allow_tf32)


def stream(
    model,
    source: str,
    cfg: StreamConfig = StreamConfig(),
    emit: Callable[[dict], None] | None = None,
    fmt: str | None = None,
    rate: int | None = None,
    channels: int | None = None,
    realtime: bool = False,
    stdin: BinaryIO | None = None,
    checkpoint: str | None = None,
    device: str | None = None,
    precision: str | None = None,
    allow_tf32: bool = False,
    threshold: float | None = None,
    multi: bool | None = None,
    multi_threshold: float | None = None,
    margin: float | None = None,
    max_genres: int | None = None,
    not_music: float | None = None,
) -> dict:
    """``embedkit stream MODEL SOURCE``: load the model (a run directory, or a Tagger), open
    the source (see ``open_source``) and run ``run_stream``; JSON Lines on stdout by default.
    device / precision: where the network runs (``embedkit.device``; None: the CPU, or where a
    given Tagger already is). One window per forward, so no batch policy applies. threshold ...
    not_music: overrides of the model's decision rule for each window's decision (the names
    and meanings of ``embedkit tag``'s)."""
    from ..device import resolve
    from .tagger import Tagger

    tagger = model if isinstance(model, Tagger) else load_model(model, checkpoint)  # loaded on the CPU
    if tagger.torch_backed and (device is not None or precision is not None):  # an ONNX model stays on onnxruntime
        tagger = tagger.to(resolve(device, allow_tf32) if device is not None else tagger.device, precision)
    src = open_source(source, fmt=fmt, rate=rate, channels=channels, realtime=realtime, stdin=stdin)
    rule = tagger.rule.with_overrides(threshold, multi, multi_threshold, margin, max_genres, not_music)
    return run_stream(tagger, src, cfg, emit or JsonLinesWriter(), rule=rule)

"""Audio ingestion: decode -> float32 mono -> resample (soxr) -> fixed clip length.

Every stage goes through this module (extraction, the CNN caches, tagging through
``excerpts.read_excerpt``, stream's file sources, serve's uploads) so that training and
deployment see exactly the same samples.

Two decoders behind one entry point (``open_audio``), chosen by what the file is (its leading
bytes, ``sniff``), not by its name:

- libsndfile (``soundfile``) for WAV / AIFF / FLAC / MP3, where it is measurably faster for
  the excerpt reads tagging does (``bench/bench_formats.py``) and sample-exact;
- FFmpeg through PyAV (``av``, whose wheels bundle FFmpeg) for everything else: AAC and
  ALAC in MP4/M4A, Ogg Vorbis / Opus / FLAC, WMA, WavPack, APE, Musepack, TTA, AC-3, CAF, and
  the audio stream of MP4 / MKV / WebM videos. A libsndfile file it cannot open goes to FFmpeg.

Encoder delay and padding are removed by the decoders as each format states them: MP4 edit
lists or iTunSMPB (AAC priming: 1024 samples from FFmpeg's encoder, 2112 from Apple's), Opus
pre-skip and Ogg granule positions (FFmpeg's skip_samples), the LAME/Xing header of MP3s (delay
+ 529, end padding; libsndfile's mpg123); sample 0 of a decode is the music's first sample.
Seeking decodes from ``PREROLL_S`` before the target (MDCT overlap, MP3's bit reservoir, Opus'
80 ms pre-roll) and drops what lies before the target sample, placing the frame a seek lands on
by its timestamp relative to the stream's sample 0 (for WMA, whose ASF container stamps
milliseconds, on the codec's fixed frame grid): an excerpt equals the same slice of a full
decode sample for sample, except bands an AAC encoder filled with noise (perceptual noise
substitution), which the decoder synthesises from a generator whose state depends on all it
decoded before: after a seek, other noise of the same energy.

    >>> clips = load("a.mp3", [16000, 22050])   # doctest: +SKIP  (one decode, two rates)
    >>> clips[16000].shape                     # doctest: +SKIP
    (480000,)
"""

from __future__ import annotations

import contextlib
import numbers
import os
import re
import sys
import warnings
from pathlib import Path

import numpy as np

from ..config import AudioConfig
from ..errors import AudioError, EmbedkitWarning

#: names a folder scan takes without looking inside (anything else is sniffed: ``is_audio``)
AUDIO_EXTENSIONS = (
    ".wav", ".wave", ".bwf", ".rf64", ".w64", ".flac", ".ogg", ".oga", ".opus", ".spx", ".aif", ".aiff",
    ".aifc", ".mp3", ".mp2", ".mpga", ".au", ".snd", ".caf", ".m4a", ".m4b", ".m4p", ".mp4", ".m4v", ".mov",
    ".3gp", ".aac", ".adts", ".alac", ".wma", ".asf", ".wv", ".ape", ".mpc", ".mp+", ".tta", ".ac3", ".eac3",
    ".dts", ".amr", ".mka", ".mkv", ".webm", ".dsf", ".dff",
)  # fmt: skip
#: what ``sniff`` names, decoded by libsndfile (faster there: bench/bench_formats.py); the
#: rest by FFmpeg (PyAV)
SNDFILE_KINDS = frozenset({"wav", "aiff", "flac", "mp3"})
#: seconds decoded before a seek target and thrown away: MDCT overlap (AAC, Vorbis, WMA), MP3's
#: bit reservoir (up to 511 bytes back, a few frames), Opus' 80 ms pre-roll
PREROLL_S = 0.2
#: a stream that ends before this share of the duration its header declares is truncated
TRUNCATED_SHARE = 0.9

#: peak below this (-120 dBFS, far under one 16-bit LSB) counts as digital silence.
SILENCE_PEAK = 1e-6
#: extra native audio decoded past offset + clip so the resampler's filter sees real samples
#: at the end of the kept part (soxr HQ's support is a few ms; 0.25 s is ample).
MARGIN_S = 0.25

# libsndfile reports chunk sizes that disagree with the file in its log ("data : 132300 (should
# be 66128)"); that is the only place a truncated WAV/AIFF shows, since it then silently decodes
# what is there. Sizes >= 2**31-1 are the "unknown length" sentinels of streamed WAVs, not damage.
_CHUNK_SIZE_RE = re.compile(r"^\s*(?:data|SSND)\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)
_STREAMING_SIZES = 0x7FFFFFFF
#: shortfalls up to this are padded without a note: codec framing makes "30 s" clips 29.98 s
#: (every FMA clip, part of GTZAN), and a warning per file would drown the real ones.
PAD_NOTE_TOLERANCE_S = 0.1

_ASF_GUID = bytes.fromhex("3026b2758e66cf11a6d900aa0062ce6c")
#: leading bytes -> kind (checked in order; ``sniff`` handles the ones needing more than a prefix)
_MAGIC = (
    (b"fLaC", "flac"),
    (b"\x1aE\xdf\xa3", "matroska"),
    (_ASF_GUID, "asf"),
    (b"wvpk", "wavpack"),
    (b"MAC ", "ape"),
    (b"MPCK", "musepack"),
    (b"MP+", "musepack"),
    (b"TTA1", "tta"),
    (b"caff", "caf"),
    (b".snd", "au"),
    (b"DSD ", "dsf"),
    (b"FRM8", "dff"),
    (b"#!AMR", "amr"),
    (b"\x0bw", "ac3"),
    (b"\x7f\xfe\x80\x01", "dts"),
)
#: leading bytes of common files that are not audio (named in the folder scan's count)
NOT_AUDIO_MAGIC = (
    (b"%PDF", "PDF"),
    (b"\x89PNG", "PNG image"),
    (b"\xff\xd8\xff", "JPEG image"),
    (b"GIF8", "GIF image"),
    (b"PK\x03\x04", "ZIP archive"),
    (b"MThd", "MIDI (notes, not audio)"),
    (b"<!DO", "HTML"),
    (b"<htm", "HTML"),
    (b"{", "JSON"),
)


def known_not_audio(head: bytes) -> str | None:
    """The name of a common non-audio format whose leading bytes ``head`` are (PDF, PNG, ZIP,
    HTML...), else None (audio, or unknown: FFmpeg may still read it)."""
    for magic, name in NOT_AUDIO_MAGIC:
        if head.startswith(magic):
            return name
    return None


def sniff(path: str | os.PathLike, head: bytes | None = None) -> str | None:
    """What the file is, from its first bytes: "wav", "aiff", "flac", "mp3", "aac" (ADTS),
    "vorbis" / "opus" / "ogg" (Ogg), "mp4", "matroska", "asf", "wavpack", "ape", "musepack",
    "tta", "caf", "au", ...; None when no audio format is recognised (FFmpeg may still probe it).
    Reads at most a few KiB (past an ID3v2 tag)."""
    if head is None:
        with open(path, "rb") as fh:
            head = fh.read(64)
            if head[:3] == b"ID3" and len(head) >= 10:
                size = (head[6] << 21) | (head[7] << 14) | (head[8] << 7) | head[9]
                fh.seek(10 + size + (10 if head[5] & 0x10 else 0))
                after = fh.read(16)
                return _after_id3(after)
    if head[:3] == b"ID3":
        return "mp3"
    if head[:4] in (b"RIFF", b"RIFX", b"RF64", b"BW64") and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"riff" and head[24:28] == b"wave":
        return "w64"  # Sony Wave64
    if head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return "aiff"
    if head[:4] == b"OggS":
        body = head[28:40]
        if body.startswith(b"\x01vorbis"):
            return "vorbis"
        if body.startswith(b"OpusHead"):
            return "opus"
        if body.startswith(b"\x7fFLAC"):
            return "oggflac"
        return "ogg"
    if head[4:8] in (b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip"):
        return "mp4"
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    return _mpeg_sync(head)


def _after_id3(after: bytes) -> str:
    if after[:4] == b"fLaC":
        return "flac-id3"  # FLAC behind an ID3v2 tag: FFmpeg reads it, libsndfile does not
    return _mpeg_sync(after) or "mp3"


def _mpeg_sync(head: bytes) -> str | None:
    if len(head) >= 4 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:
        layer = (head[1] >> 1) & 3
        if layer == 0 and head[1] & 0xF6 == 0xF0:
            return "aac"  # ADTS
        if layer and (head[2] >> 4) != 0xF and (head[2] >> 2) & 3 != 3:
            return "mp3"  # MPEG-1/2/2.5 layer I-III (a valid bitrate and sample-rate index)
    return None


def not_audio_kind(path: str | os.PathLike) -> str:
    """A word for a file ``sniff`` did not recognise (the folder scan's "not audio" note)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    name = known_not_audio(head)
    if name is not None:
        return name
    if not head:
        return "empty"
    return "unrecognised content"


#: names a folder scan never takes for audio: path lists and playlists (read as lists by
#: ``tag``, never decoded)
LIST_SUFFIXES = (".txt", ".csv", ".tsv", ".lst", ".m3u", ".m3u8")


def scan_kind(path: str | os.PathLike) -> str | None:
    """The folder scans' one rule (``tag``'s inputs and a ``<label>/<file>`` dataset): None when
    the file is audio to decode (an audio extension, or leading bytes ``sniff`` recognises: an
    MP3 saved without extension), else a few words for the scan's "not audio" note ("hidden
    file", "JPEG image", "broken link"...)."""
    p = Path(path)
    name = p.name
    if not p.is_file():  # a link to nothing, a FIFO or socket
        return "broken link" if p.is_symlink() else "not a regular file"
    if name.startswith("._"):  # macOS AppleDouble metadata beside a copied file
        return "macOS metadata (._ file)"
    if p.suffix.lower() in AUDIO_EXTENSIONS:
        return None
    if name.startswith("."):
        return "hidden file"
    if p.suffix.lower() in LIST_SUFFIXES:
        return "text / path list"
    return None if is_audio(p) else not_audio_kind(p)


def not_audio_note(not_audio: list[tuple[str, str]], where: str = "in the folders scanned", examples: int = 1) -> str:
    """One line for what a scan left out: ``not_audio`` (path, ``scan_kind``) counted by kind,
    with ``examples`` paths."""
    from collections import Counter

    by = ", ".join(f"{n} {k}" for k, n in Counter(k for _, k in not_audio).most_common())
    first = "; e.g. " + ", ".join(p for p, _ in not_audio[:examples]) if examples else ""
    n = len(not_audio)
    return f"{n} file{'s' if n != 1 else ''} {where} {'are' if n != 1 else 'is'} not audio ({by}){first}"


def is_audio(path: str | os.PathLike) -> bool:
    """True when the file's leading bytes are an audio format the decoder reads (cheap: no
    decoding). Unreadable files are False."""
    try:
        return sniff(path) is not None
    except OSError:
        return False


def _truncation(extra_info: str) -> str | None:
    m = _CHUNK_SIZE_RE.search(extra_info or "")
    if not m:
        return None
    declared, actual = int(m.group(1)), int(m.group(2))
    if declared >= _STREAMING_SIZES or declared <= actual:
        return None
    frac = actual / declared
    return f"truncated: the header announces {declared} bytes of audio but the file holds {actual} ({frac:.0%})"


def decode_error(path: Path, exc: Exception) -> AudioError:
    """A libsndfile / FFmpeg exception as a one-line AudioError naming the file."""
    msg = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    msg = msg.replace(f"Error opening {str(path)!r}: ", "")  # the path is already in front
    msg = msg.replace(f": {str(path)!r}", "").replace(f"{str(path)!r}", "").strip(" :")
    msg = re.sub(r"^\[Errno -?\d+\]\s*", "", msg)  # PyAV's "[Errno 1094995529] Invalid data ..."
    if "does not exist or is not a regular file" in msg and path.is_file():
        msg = "not audio, or a format libsndfile cannot read"  # its MP3 reader's wording for junk
    if msg.startswith("Invalid data found when processing input"):
        msg = "not audio, or damaged beyond decoding"
        with contextlib.suppress(OSError):
            if sniff(path) == "mp4":
                msg = "an MP4 without its index (no 'moov' box): truncated or damaged"
    elif msg == "End of file":
        msg = "the file ends inside its header: truncated"
    return AudioError(path, f"cannot decode audio ({msg})")


def open_audio(path: str | os.PathLike):
    """An open reader of ``path`` (the caller closes it; a context manager) with
    ``soundfile.SoundFile``'s reading interface: ``samplerate``, ``channels``, ``frames``,
    ``format``, ``seek(frame)``, ``read(frames, dtype="float32", always_2d=True)``. libsndfile
    for WAV / AIFF / FLAC / MP3, FFmpeg (``AvFile``) for the rest (``sniff``). The checks every reader
    shares come first: missing, a directory, empty, not decodable, WAV / AIFF headers announcing
    more audio than the file holds, no audio stream, DRM. Raises AudioError naming the file."""
    p = Path(path)
    if not p.exists():
        raise AudioError(p, "file not found")
    if p.is_dir():
        raise AudioError(p, "is a directory, not an audio file")
    try:
        if p.stat().st_size == 0:
            raise AudioError(p, "empty file (0 bytes)")
        kind = sniff(p)
    except OSError as exc:
        raise AudioError(p, f"cannot read the file ({exc.strerror or exc})") from None
    if kind in SNDFILE_KINDS:
        import soundfile as sf

        try:
            fh = sf.SoundFile(str(p))
        except Exception as exc:
            if kind == "flac":  # libsndfile reads FLAC only; FFmpeg says what is wrong no better
                raise decode_error(p, exc) from None
            return AvFile(p)  # WAV/AIFF holding a codec libsndfile lacks (MP3 in WAV, A-law AIFC...)
        if fh.format in ("WAV", "WAVEX", "AIFF", "RF64"):
            problem = _truncation(fh.extra_info)
            if problem:
                fh.close()
                raise AudioError(p, problem)
        return fh
    return AvFile(p)


class AvFile:
    """An audio stream decoded by FFmpeg (PyAV), read like a ``soundfile.SoundFile``.

    The best audio stream of the container is decoded (a music video's soundtrack, an M4A's
    audio beside its cover); frames are converted to float32 [n, channels] the way libsndfile
    scales integers (x / 2**(bits-1)), so lossless files decode to the same numbers through
    either library. Positions are samples from the stream's first decoded frame (after FFmpeg
    has applied the encoder delay / edit list), so ``seek(k)`` then ``read`` equals a full
    decode's samples from k on (see the module docstring for the precision per container).
    """

    def __init__(self, path: str | os.PathLike):
        import av

        self.name = str(path)
        self._path = Path(path)
        try:
            self._c = av.open(self.name, metadata_errors="ignore")
        except av.FFmpegError as exc:
            raise decode_error(self._path, exc) from None
        try:
            self._open_stream()
        except BaseException:
            self._c.close()
            raise

    def _open_stream(self) -> None:
        import av

        try:
            from av.stream import Discard  # PyAV >= 15
        except ImportError:
            Discard = None

        s = self._c.streams.best("audio")
        if s is None:
            what = "video" if self._c.streams.video else "no streams" if not self._c.streams else "other streams"
            raise AudioError(self._path, f"cannot decode audio (no audio stream: the file holds {what} only)")
        tag = str(getattr(s.codec_context, "codec_tag", "") or "").lower()
        if tag in ("drms", "drmi", "enca", "encv"):  # iTunes FairPlay (.m4p), CENC encryption
            raise AudioError(self._path, "cannot decode audio (DRM-protected: FairPlay / encrypted audio)")
        for other in self._c.streams:
            if other is not s and Discard is not None:
                other.discard = Discard["all"]  # demux only the audio (a video's frames are not read into packets)
        self._s = s
        cc = s.codec_context
        cc.thread_count = 1  # one lane per core (embedkit.jobs): no decoder threads of its own
        self.samplerate = int(cc.sample_rate or 0)
        self.channels = int(cc.channels or 0)
        if self.samplerate <= 0 or self.channels <= 0:
            raise AudioError(self._path, f"cannot decode audio (no decoder for {cc.name or 'this codec'})")
        self.format = self._c.format.name.split(",")[0].upper()
        self.subtype = cc.name.upper()
        self.extra_info = ""
        self._frames_gen = None
        self._buf: list[list[np.ndarray]] = []  # decoded blocks, each one 1-D array per channel
        self._buffered = 0
        self._pos = 0  # position (samples from the first decoded frame) of the next sample read
        self._errors = 0
        self._origin_ts = 0
        self._grid: tuple[int, int] | None = None
        self._end: int | None = None
        self.frames, self._exact_length, self._opened = -1, False, False
        try:
            first = self._next_frame()
            second = self._next_frame() if first is not None else None
        except av.FFmpegError as exc:
            raise decode_error(self._path, exc) from None
        if first is None:
            raise AudioError(self._path, "no audio samples (zero-length or unreadable stream)")
        # The stream's sample 0, in timestamps. From the second frame where there is one: the
        # first frame's timestamp was shifted by the samples the decoder skipped (encoder delay),
        # which a millisecond time base (Matroska, ASF) rounds; the second frame's is the packet's.
        if second is not None and second.pts is not None and first.pts is not None:
            self._origin = _ts_samples(second, self.samplerate) - first.samples
        else:
            self._origin = _ts_samples(first, self.samplerate) if first.pts is not None else 0
        tb = self._s.time_base
        self._origin_ts = int(round(self._origin / self.samplerate / tb)) if tb else 0
        self._push(first)
        if second is not None:
            self._push(second)
        # WMA frames hold a fixed number of samples but ASF stamps them in milliseconds: place a
        # frame found by seeking on that grid, not at its rounded timestamp.
        self._grid = None
        if cc.name in _FIXED_FRAME_CODECS and second is not None and second.samples:
            self._grid = (first.samples, second.samples)
        self.frames = self._declared_frames()
        self._exact_length = self._declares_length()
        # Ogg's last granule position and an MP4's edit list give the exact length; FFmpeg's
        # decoders still emit the last frame's padding (up to a frame), which is cut here.
        self._end = self.frames if self.frames > 0 and self._c.format.name.split(",")[0] in ("ogg", "mov") else None
        self._opened = True

    # -- SoundFile's interface -------------------------------------------------------------
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._frames_gen = None
        self._c.close()

    @property
    def duration(self) -> float:
        return self.frames / self.samplerate if self.frames > 0 else 0.0

    def seek(self, frame: int) -> int:
        """Position the next ``read`` at sample ``frame`` (from the stream's start)."""
        import av

        frame = max(0, int(frame))
        self._buf, self._buffered, self._frames_gen = [], 0, None
        tb = self._s.time_base
        t = frame / self.samplerate - PREROLL_S
        try:
            if t > 0 and tb:
                target = int(t / tb) + self._origin_ts
                self._c.seek(target, stream=self._s, backward=True, any_frame=False)
            else:
                self._c.seek(0, stream=self._s, backward=True, any_frame=False)
            self._pos = None
            while True:
                fr = self._next_frame()
                if fr is None:
                    self._pos = frame
                    return frame
                if fr.pts is None:  # no timestamps to place the frame by: count from the start
                    return self._seek_from_start(frame)
                a = _frame_planes(fr, self.channels)
                n = len(a[0])
                at = self._frame_pos(fr, self._pos) if self._pos is None else self._pos
                if at + n > frame:
                    if at > frame:  # landed after the target (coarse index): decode from the start
                        return self._seek_from_start(frame)
                    self._pos = frame
                    self._buf, self._buffered = [[c[frame - at :] for c in a]], n - (frame - at)
                    return frame
                self._pos = at + n
        except av.FFmpegError as exc:
            raise decode_error(self._path, exc) from None

    def read(self, frames: int = -1, dtype: str = "float32", always_2d: bool = True) -> np.ndarray:
        """Up to ``frames`` samples (-1: to the end) as float32 [n, channels]."""
        import av

        want = None if frames is None or frames < 0 else int(frames)
        if self._pos is None:
            self._pos = 0
        if self._end is not None:
            left = max(0, self._end - self._pos)
            want = left if want is None else min(want, left)
        try:
            while want is None or self._buffered < want:
                fr = self._next_frame()
                if fr is None:
                    self._check_complete(self._pos + self._buffered)
                    break
                self._push(fr)
        except av.FFmpegError as exc:
            raise decode_error(self._path, exc) from None
        data = np.empty((self.channels, self._buffered), np.float32)
        for c in range(self.channels):
            if self._buf:
                np.concatenate([b[c] for b in self._buf], out=data[c])
        if want is not None and data.shape[1] > want:
            out, rest = data[:, :want], data[:, want:]
            self._buf, self._buffered = [list(rest)], rest.shape[1]
        else:
            out, self._buf, self._buffered = data, [], 0
        self._pos = (self._pos or 0) + out.shape[1]
        # [channels, n] blocks, returned as the [n, channels] view: one copy in all, and each
        # channel stays contiguous for the down-mix
        return out.T

    # -- internals -------------------------------------------------------------------------
    def _push(self, fr) -> None:
        a = _frame_planes(fr, self.channels)
        self._buf.append(a)
        self._buffered += len(a[0])

    def _frame_pos(self, fr, fallback: int | None) -> int:
        """The sample index (from this stream's first decoded frame) where ``fr`` starts."""
        if fr.pts is None or fr.time_base is None:
            return fallback or 0
        pos = _ts_samples(fr, self.samplerate) - self._origin
        if self._grid is not None and pos > self._grid[0]:
            first, size = self._grid
            pos = first + int(round((pos - first) / size)) * size
        return pos

    def _next_frame(self):
        import av

        if self._frames_gen is None:
            self._frames_gen = self._decode_frames()
        try:
            fr = next(self._frames_gen)
        except StopIteration:
            self._frames_gen = iter(())
            return None
        except av.FFmpegError:
            raise
        if fr.sample_rate != self.samplerate:
            raise AudioError(
                self._path,
                f"cannot decode audio (the sample rate changes mid-stream: {self.samplerate} -> {fr.sample_rate} Hz)",
            )
        return fr

    def _decode_frames(self):
        import av

        packets = self._c.demux(self._s)
        while True:
            try:
                packet = next(packets)
            except StopIteration:
                return
            except av.FFmpegError as exc:
                # The container breaks off (a cut download, a damaged block): say where, and
                # that it was cut when the header announced more.
                if not self._opened:  # the first frames: decode_error names the problem
                    raise
                end = (self._pos or 0) + self._buffered
                problem = _truncated(self._path, end, self.frames, self.samplerate) if self._exact_length else None
                if problem is not None:
                    raise problem from None
                msg = decode_error(self._path, exc).problem
                raise AudioError(self._path, f"{msg[:-1]}; after {end / self.samplerate:.2f} s)") from None
            try:
                yield from packet.decode()
            except av.InvalidDataError:
                # A damaged packet: FFmpeg's own tools skip it and go on; a file of nothing but
                # damage is not audio.
                self._errors += 1
                if self._errors > 100:
                    raise

    def _seek_from_start(self, frame: int) -> int:
        self._c.seek(0, stream=self._s, backward=True, any_frame=False)
        self._buf, self._buffered, self._frames_gen, self._pos = [], 0, None, 0
        skip = frame
        while skip > 0:
            fr = self._next_frame()
            if fr is None:
                break
            n = fr.samples
            if n > skip:
                a = [c[skip:] for c in _frame_planes(fr, self.channels)]
                self._buf, self._buffered = [a], len(a[0])
                break
            skip -= n
        self._pos = frame
        return frame

    def _declared_frames(self) -> int:
        s, c = self._s, self._c
        if s.duration and s.time_base:
            return int(round(float(s.duration * s.time_base) * self.samplerate))
        if c.duration:
            return int(round(c.duration / 1_000_000 * self.samplerate))
        return -1

    def _declares_length(self) -> bool:
        # Not MP3: a Xing header's frame count can be the whole track's in clips cut from it
        # (FMA's "Xing stream size off"), so a short MP3 is decoded as what it holds.
        return self._c.format.name.split(",")[0] in _HEADER_DURATION_FORMATS

    def _check_complete(self, end: int) -> None:
        """At the end of the stream: a file that stops well before the duration its header
        declares was cut (an interrupted copy or download)."""
        problem = _truncated(self._path, end, self.frames, self.samplerate) if self._exact_length else None
        if problem is not None:
            raise problem


#: codecs whose frames all hold the same number of samples (but whose container, ASF, stamps
#: them in milliseconds)
_FIXED_FRAME_CODECS = ("wmav1", "wmav2")
#: FFmpeg demuxers whose duration comes from the file's header (not estimated from a bitrate,
#: nor read at the end of the file), so a stream ending well before it was cut
_HEADER_DURATION_FORMATS = ("mov", "matroska", "asf", "flac", "wv", "ape", "tta", "mpc", "mpc8", "caf")


def _ts_samples(fr, sample_rate: int) -> int:
    """A decoded frame's timestamp in samples (not yet relative to the stream's origin)."""
    return int(round(float(fr.pts * fr.time_base) * sample_rate))


def _truncated(path: Path, end: int, declared: int, sr: int) -> AudioError | None:
    if declared > 0 and end < TRUNCATED_SHARE * declared - sr:
        return AudioError(
            path,
            f"truncated: the header announces {declared / sr:.2f} s but the file holds {end / sr:.2f} s ({end / declared:.0%})",
        )
    return None


_INT_BITS = {"s16": 16, "s32": 32, "s64": 64}
_DTYPES = {"u8": np.uint8, "s16": np.int16, "s32": np.int32, "s64": np.int64, "flt": np.float32, "dbl": np.float64}


def _frame_planes(fr, channels: int) -> list[np.ndarray]:
    """A decoded PyAV frame as one float32 array [n] per channel, integers scaled as libsndfile
    scales them (x / 2**(bits-1)). Reads the planes directly: PyAV's to_ndarray stacks them in
    Python, and a per-frame 2-D array costs more than the decoding of a 1024-sample AAC frame."""
    fmt = fr.format
    base = fmt.name.rstrip("p")
    dt = _DTYPES[base]
    n = fr.samples
    if fmt.is_planar:
        planes = [np.frombuffer(plane, dt, count=n) for plane in fr.planes]
    else:
        n_ch = len(fr.layout.channels)
        a = np.frombuffer(fr.planes[0], dt, count=n * n_ch).reshape(n, n_ch)
        planes = [a[:, c] for c in range(n_ch)]
    if base == "dbl":
        planes = [x.astype(np.float32) for x in planes]
    elif base == "u8":
        planes = [(x.astype(np.float32) - np.float32(128)) / np.float32(128) for x in planes]
    elif base != "flt":
        scale = np.float32(2.0 ** (1 - _INT_BITS[base]))
        planes = [x.astype(np.float32) * scale for x in planes]
    if len(planes) != channels:  # the layout changed mid-stream (HE-AAC PS, broadcast): keep the width
        mono = np.mean(planes, axis=0, dtype=np.float32)
        planes = [mono] * channels
    return planes


def decode(path: str | os.PathLike, max_seconds: float | None = None, start_s: float = 0.0) -> tuple[np.ndarray, int]:
    """Decode a file to float32 mono at its native rate.

    max_seconds: decode only the first ``max_seconds`` (None: the whole file); the samples are
    the same as the start of a full decode, so long files cost only what is kept.
    start_s: seek to this time first (sample round(start_s * sr); the decoder skips what lies
    before, so an excerpt from the middle of a long file costs only the excerpt).
    Returns (y [n_samples] float32, sample_rate Hz). Channels are averaged. Raises AudioError
    naming the file and the problem for missing, empty, unreadable/truncated files and NaN/inf.
    """
    p = Path(path)
    with open_audio(p) as fh:
        try:
            sr = int(fh.samplerate)
            frames = -1 if max_seconds is None else int(np.ceil(max_seconds * sr))
            if start_s > 0:
                target = int(round(start_s * sr))
                fh.seek(min(target, fh.frames) if fh.frames > 0 else target)
            data = fh.read(frames, dtype="float32", always_2d=True)
        except AudioError:
            raise
        except Exception as exc:  # libsndfile raises LibsndfileError/RuntimeError/TypeError variants
            raise decode_error(p, exc) from None
    if data.shape[0] == 0:
        raise AudioError(p, "no audio samples (zero-length or unreadable stream)")
    if not np.isfinite(data).all():
        raise AudioError(p, "contains NaN or infinite samples")
    return np.ascontiguousarray(_downmix(data), dtype=np.float32), sr


def _downmix(data: np.ndarray) -> np.ndarray:
    """[n, channels] -> [n]: the channel average (keeps the level of mono content in stereo).
    Summing columns is ~10x faster than data.mean(axis=1), a strided reduction that cost 23 ms
    per 30 s stereo clip, more than the resampling; the result is the same."""
    if data.shape[1] == 1:
        return data[:, 0]
    y = data[:, 0].copy()
    for c in range(1, data.shape[1]):
        y += data[:, c]
    y /= np.float32(data.shape[1])
    return y


def resample(y: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Band-limited resampling with soxr (HQ); no-op when rates match.

    y float32 [n] at sr_in Hz -> float32 [~n * sr_out / sr_in] at sr_out Hz."""
    if sr_in == sr_out:
        return y
    import soxr

    return soxr.resample(np.ascontiguousarray(y, dtype=np.float32), sr_in, sr_out, quality="HQ").astype(
        np.float32, copy=False
    )


def _note(msg: str, notes: list[str] | None) -> None:
    # Batch jobs collect notes (thread-safe, summarised once); interactive use gets a warning.
    if notes is not None:
        notes.append(msg)
    else:
        warnings.warn(msg, EmbedkitWarning, stacklevel=3)


def fix_length(
    y: np.ndarray, sr: int, cfg: AudioConfig, path: str | os.PathLike = "<array>", notes: list[str] | None = None
) -> np.ndarray:
    """Bring a clip to cfg.clip_s seconds (round(clip_s * sr) samples).

    Longer clips keep [offset, offset + clip_s), the offset clamped so the window stays inside
    the file; shorter ones are looped or zero-padded (cfg.pad_mode) with a note (a warning, or
    appended to ``notes`` when a list is given) unless the shortfall is under
    PAD_NOTE_TOLERANCE_S. clip_s None keeps the native length after offset.
    """
    start = int(round(cfg.offset_s * sr))
    if cfg.clip_s is None:
        if start >= len(y):
            _note(
                f"{path}: offset {cfg.offset_s:g} s is past the end ({len(y) / sr:.2f} s); kept the whole clip", notes
            )
            return y
        return y[start:]
    target = int(round(cfg.clip_s * sr))
    if len(y) - start >= target:
        return y[start : start + target]
    if len(y) >= target:  # offset pushed past the end: take the last clip_s seconds instead
        _note(
            f"{path}: offset {cfg.offset_s:g} s leaves less than {cfg.clip_s:g} s; kept the last {cfg.clip_s:g} s",
            notes,
        )
        return y[len(y) - target :]
    if target - len(y) > PAD_NOTE_TOLERANCE_S * sr:
        _note(f"{path}: {len(y) / sr:.2f} s is shorter than {cfg.clip_s:g} s; {cfg.pad_mode}-padded", notes)
    if cfg.pad_mode == "loop":
        reps = int(np.ceil(target / len(y)))
        return np.tile(y, reps)[:target]
    out = np.zeros(target, dtype=np.float32)
    out[: len(y)] = y
    return out


def load(
    path: str | os.PathLike,
    sample_rates: int | list[int] | tuple[int, ...],
    cfg: AudioConfig = AudioConfig(),
    min_duration_s: float = 0.0,
    reject_silence: bool = True,
    notes: list[str] | None = None,
) -> dict[int, np.ndarray] | np.ndarray:
    """Decode once and return the clip at each requested rate.

    With a single int rate returns float32 [round(clip_s * rate)]; with a list returns
    {rate: array}. Only the part of the file the length policy keeps is decoded. Raises
    AudioError for files shorter than ``min_duration_s`` or digitally silent. Padding/trimming
    adjustments become warnings, or entries of ``notes`` when a list is passed.
    """
    single = isinstance(sample_rates, numbers.Integral)
    rates = [int(sample_rates)] if single else [int(r) for r in sample_rates]
    if not rates:
        raise ValueError("at least one sample rate is needed")
    max_s = None
    if cfg.clip_s is not None:
        max_s = max(cfg.offset_s + cfg.clip_s, min_duration_s) + MARGIN_S
    y, sr = decode(path, max_seconds=max_s)
    duration = len(y) / sr
    if duration < min_duration_s:
        raise AudioError(path, f"too short: {duration:.2f} s < {min_duration_s:g} s (one segment)")
    out: dict[int, np.ndarray] = {}
    for rate in dict.fromkeys(rates):
        # Notes are identical at every rate; record them once.
        out[rate] = fix_length(resample(y, sr, rate), rate, cfg, path, notes if rate == rates[0] else [])
    if reject_silence and float(np.max(np.abs(out[rates[0]]))) < SILENCE_PEAK:
        raise AudioError(path, "silent (every kept sample is zero)")
    return out[rates[0]] if single else out


def probe(path: str | os.PathLike) -> dict:
    """Cheap metadata (headers, and two frames for FFmpeg formats): duration_s (the header's;
    FFmpeg estimates it from the bitrate where a file declares none), sample_rate, channels."""
    with open_audio(path) as fh:  # raises AudioError naming the file and the problem
        duration = fh.frames / fh.samplerate if fh.frames > 0 else 0.0
        return {"duration_s": duration, "sample_rate": int(fh.samplerate), "channels": int(fh.channels)}


@contextlib.contextmanager
def native_stderr_to(log_path: str | os.PathLike):
    """Send what C libraries write straight to file descriptor 2 (libmpg123's "Xing stream size
    off" and similar decoder chatter, once per MP3 in FMA) to ``log_path`` while Python-level
    stderr (progress bars, messages) keeps reaching the terminal. No-op where fd 2 is not
    available. The redirect is process-wide, so use it around a whole batch job, not per file.
    """
    try:
        sys.__stderr__.flush()
        saved = os.dup(2)
    except (AttributeError, OSError, ValueError):
        yield
        return
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    old_stderr = sys.stderr
    replaced = None
    try:
        if old_stderr is sys.__stderr__:  # a real terminal/pipe: keep Python output on it
            replaced = os.fdopen(
                os.dup(saved),
                "w",
                buffering=1,
                encoding=getattr(old_stderr, "encoding", None) or "utf-8",
                errors="backslashreplace",
            )
            sys.stderr = replaced
        with open(log_path, "ab") as log:
            os.dup2(log.fileno(), 2)
        yield
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        if replaced is not None:
            sys.stderr = old_stderr
            replaced.close()

"""Prompt tokenisation as the official GPT4RoI model saw it.

The official model was trained with the slow SentencePiece ``LlamaTokenizer`` of transformers
~4.29. That tokenizer split the text on added tokens (``<bbox>``, ``<im_start>``...), stripped
the whitespace next to each added token, and SentencePiece-encoded every remaining text piece on
its own, each with its own leading "▁" (SentencePiece's dummy prefix). Modern tokenizers do not
do this, so ids are built piecewise here: BOS + encode(piece) + special id + encode(piece) ...

Two piece encoders exist: the LLaMA ``tokenizer.model`` of a real checkpoint (through the
``sentencepiece`` package, imported only when used), and a small builtin Unigram tokenizer made
fully offline for the ``tiny`` and ``demo`` presets.
"""

from __future__ import annotations

import json
import re
import string
from pathlib import Path
from typing import Protocol, Sequence

from .config import TokenConfig

IMAGE_PLACEHOLDER = "<image>"
BUILTIN_BASE_VOCAB_SIZE = 2048
BUILTIN_TOKENIZER_FILE = "tokenizer.json"
SENTENCEPIECE_FILE = "tokenizer.model"

_SPECIAL_NAMES = ("[PAD]", "<im_patch>", "<bbox>", "<point>", "<im_start>", "<im_end>")
_SPLIT = re.compile("(" + "|".join(re.escape(s) for s in (*_SPECIAL_NAMES, IMAGE_PLACEHOLDER)) + ")")


class PieceEncoder(Protocol):
    """Encodes one text piece the way SentencePiece does (with a leading dummy "▁")."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def piece_text(self, i: int) -> str: ...

    def save(self, directory: Path) -> None: ...


class PromptTokenizer:
    """Piecewise prompt encoder: text pieces + special ids, as the legacy slow tokenizer did."""

    def __init__(self, pieces: PieceEncoder, tokens: TokenConfig, num_image_tokens: int):
        self.pieces = pieces
        self.tokens = tokens
        self.num_image_tokens = num_image_tokens
        self._special = tokens.added_tokens()

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of ``text``; ``<image>`` expands to ``<im_start>`` + N x ``<im_patch>`` + ``<im_end>``."""
        parts = _SPLIT.split(text)
        ids = [self.tokens.bos_id] if add_bos else []
        for i, part in enumerate(parts):
            if i % 2:  # a special token (re.split puts the captured separators at odd indices)
                ids.extend(self._special_ids(part))
                continue
            # Whitespace touching an added token is stripped, as the legacy tokenizer did.
            if i > 0:
                part = part.lstrip()
            if i < len(parts) - 1:
                part = part.rstrip()
            if part:
                ids.extend(self.pieces.encode(part))
        return ids

    def _special_ids(self, name: str) -> list[int]:
        if name == IMAGE_PLACEHOLDER:
            t = self.tokens
            return [t.im_start_id] + [t.im_patch_id] * self.num_image_tokens + [t.im_end_id]
        return [self._special[name]]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of generated ids; BOS/EOS and added tokens are skipped."""
        base = self.tokens.base_vocab_size
        known = min(base, self.pieces.vocab_size)  # ids a stand-in vocabulary lacks decode to nothing
        keep = [i for i in ids if i < known and i not in (self.tokens.bos_id, self.tokens.eos_id)]
        return self.pieces.decode(keep)

    def save(self, directory: str | Path) -> None:
        self.pieces.save(Path(directory))

    def token_texts(self) -> list[str]:
        """The text each id adds when a generation is decoded ("" for ids :meth:`decode` skips).

        Lets the engine detect a stop string on token ids, without decoding whole texts.
        """
        base = self.tokens.base_vocab_size
        known = min(base, self.pieces.vocab_size)  # a stand-in vocabulary (random weights) may be smaller
        texts = [self.pieces.piece_text(i) for i in range(known)] + [""] * (base - known)
        for i in (self.tokens.bos_id, self.tokens.eos_id):
            texts[i] = ""
        return texts + [""] * (self.tokens.im_end_id + 1 - base)


# The builtin offline tokenizer ------------------------------------------------------------------

# Words of the prompt templates and of the region vocabulary (objects, attributes, relations).
_BUILTIN_WORDS = """
a an the and or of in on at to by with from for as is are be it its this that these those there
which what who where how why when can could would will you me i my your please give provide tell
describe description detailed detail brief short region regions mentioned marked indicated shown
shows picture image photo overview provides area areas object objects thing something located
chat between curious human artificial intelligence assistant gives helpful polite answers answer
question questions s great about inside particular only one two three four five six seven eight
nine ten each time categories containing category name based see imagery conversation below
simply relation relationship relative position respect other others basic attributes attribute
colour color shape material texture size action doing does do made look looks like kind type
red orange yellow green blue purple pink brown black white gray grey cyan magenta gold silver
circle square triangle rectangle star hexagon pentagon ellipse diamond cross heart ring
wooden wood metal metallic plastic glass stone fabric rubber paper striped dotted checkered plain
smooth rough shiny matte solid
small medium large big tiny huge larger smaller bigger same
left right above below over under behind front next near far overlapping overlaps touching
top bottom middle center centre side corner
person people man woman child boy girl dog cat horse bird car bus truck bicycle motorcycle
train boat airplane chair table cup bottle phone laptop book tree sky road building ball
standing sitting walking running holding riding wearing looking lying eating playing
yes no not unknown none nothing
"""


def _builtin_vocab() -> list[tuple[str, float]]:
    """(piece, log-prob score) list: specials, characters, then whole words. Deterministic."""
    pieces: list[str] = ["<unk>", "<s>", "</s>", "▁"]
    chars = [c for c in string.printable if c not in " \t\r\x0b\x0c"]  # keeps "\n"
    for c in chars:
        pieces += [c, "▁" + c]
    pieces += ["###", "▁###"]
    seen = set(pieces)
    for w in _BUILTIN_WORDS.split():
        for p in ("▁" + w, w, "▁" + w.capitalize(), w.capitalize()):
            if p not in seen:
                seen.add(p)
                pieces.append(p)
    if len(pieces) > BUILTIN_BASE_VOCAB_SIZE:
        raise AssertionError(f"builtin vocabulary has {len(pieces)} pieces > {BUILTIN_BASE_VOCAB_SIZE}")
    pieces += [f"<unused{i}>" for i in range(BUILTIN_BASE_VOCAB_SIZE - len(pieces))]
    # Whole pieces score better than their spelling, so Viterbi prefers the longest pieces.
    return [(p, 0.0 if p.startswith("<") else -10.0 if len(p.lstrip("▁")) <= 1 else -2.0) for p in pieces]


class BuiltinPieces:
    """A small SentencePiece-like Unigram tokenizer built offline with the ``tokenizers`` package."""

    def __init__(self, tokenizer=None):
        if tokenizer is None:
            tokenizer = self._build()
        self._tok = tokenizer

    @staticmethod
    def _build():
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        tok = Tokenizer(models.Unigram(_builtin_vocab(), unk_id=0, byte_fallback=False))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
        return tok

    @classmethod
    def load(cls, directory: str | Path) -> "BuiltinPieces":
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(Path(directory) / BUILTIN_TOKENIZER_FILE)))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def piece_text(self, i: int) -> str:
        return self._tok.id_to_token(i).replace("▁", " ")

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(directory / BUILTIN_TOKENIZER_FILE))


class SentencePiecePieces:
    """The LLaMA SentencePiece model of a real checkpoint (``tokenizer.model``)."""

    def __init__(self, model_file: str | Path):
        try:
            import sentencepiece
        except ImportError as e:  # pragma: no cover - sentencepiece is a declared dependency
            raise ImportError("reading a LLaMA tokenizer.model needs the 'sentencepiece' package") from e
        self.model_file = Path(model_file)
        self._sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def piece_text(self, i: int) -> str:
        piece = self._sp.id_to_piece(i)
        if self._sp.is_byte(i):  # "<0x23>" -> "#"
            return bytes([int(piece[3:5], 16)]).decode("latin-1")
        return "" if self._sp.is_control(i) else piece.replace("▁", " ")

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode(list(ids))

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / SENTENCEPIECE_FILE).write_bytes(self.model_file.read_bytes())


def load_pieces(directory: str | Path, kind: str) -> PieceEncoder:
    """The piece encoder saved in a checkpoint directory."""
    directory = Path(directory)
    if kind == "builtin":
        path = directory / BUILTIN_TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"expected the builtin tokenizer at {path}; it is missing")
        return BuiltinPieces.load(directory)
    if kind == "sentencepiece":
        path = directory / SENTENCEPIECE_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"expected the LLaMA SentencePiece model at {path}; copy tokenizer.model from the "
                "checkpoint you downloaded into this directory"
            )
        return SentencePiecePieces(path)
    raise ValueError(f"unknown tokenizer kind {kind!r}; valid kinds: builtin, sentencepiece")


def check_vocab(pieces: PieceEncoder, tokens: TokenConfig) -> None:
    """The piece vocabulary must end where the added tokens begin."""
    size = getattr(pieces, "vocab_size", None)
    if size is not None and size != tokens.base_vocab_size:
        raise ValueError(
            f"tokenizer has {size} pieces but the config places the added tokens at {tokens.base_vocab_size}"
        )


def write_added_tokens(directory: Path, tokens: TokenConfig) -> None:
    (directory / "added_tokens.json").write_text(json.dumps(tokens.added_tokens(), indent=2))

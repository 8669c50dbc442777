"""LLaVA-format conversations: reading, validation with skip accounting, collation.

Records look like ``{"id", "image", "conversations": [{"from": "human"|"gpt",
"value"}]}`` with an ``<image>`` placeholder in a human turn. A validation pass
reads every record once (parsing, opening images, encoding with every model's
processor) so that skipped samples are counted before training starts; the
collator then encodes the same raw sample once per model, so teacher and
student may use different processors and image-token counts.

Prompts are rendered by the model's own chat template. Labels are ``IGNORE_INDEX``
everywhere except on assistant answers (and the template's end-of-turn token).

Encoding (chat template, tokenizer, image processor) costs milliseconds per sample and
model, more than a tiny model's training step, so encodings are kept in an explicit
:class:`DataCache` that the caller owns: one per training run by default, or one
shared by several runs in a process (sweeps, the demo), which then also validate a
data set once.
"""

# The public names, from the modules that define them.
from betakd.data.cache import DataCache, EncodingCache, conversation_key, default_encoding_bytes
from betakd.data.collate import KDCollator, image_counts, pad_encoded
from betakd.data.dataset import ConversationDataset, build_dataset
from betakd.data.encoding import Encoded, SampleEncoder, Segment
from betakd.data.records import (
    IMAGE_PLACEHOLDER,
    ROLES,
    SKIP_REASONS,
    Conversation,
    DataError,
    SkipReport,
    SkipSample,
    load_records,
    open_image,
    open_images,
    parse_record,
)
from betakd.labels import IGNORE_INDEX

__all__ = [
    "IGNORE_INDEX",
    "IMAGE_PLACEHOLDER",
    "ROLES",
    "SKIP_REASONS",
    "Conversation",
    "ConversationDataset",
    "DataCache",
    "DataError",
    "Encoded",
    "EncodingCache",
    "KDCollator",
    "SampleEncoder",
    "Segment",
    "SkipReport",
    "SkipSample",
    "build_dataset",
    "conversation_key",
    "default_encoding_bytes",
    "image_counts",
    "load_records",
    "open_image",
    "open_images",
    "pad_encoded",
    "parse_record",
]

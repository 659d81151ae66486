"""Tiny ONNX models built with ``onnx.helper``: what a sensor appliance runs beside its language model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

CLASSES = ["idle", "walking", "running"]
W = np.array([[1.0, -1.0, 0.5], [0.5, 2.0, -1.0], [-1.0, 0.5, 2.0], [0.2, 0.1, 0.3]], dtype=np.float32)
B = np.array([0.1, -0.2, 0.05], dtype=np.float32)
ANOMALY_CENTRE = np.linspace(-1, 1, 8).astype(np.float32)


def _save(graph, path: Path) -> Path:
    import onnx
    from onnx import helper
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="appliance-tests")
    model.ir_version = 8  # readable by every onnxruntime we target
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def write_classifier(path: Path) -> Path:
    """features [N, 4] float32 -> probabilities [N, 3] (softmax of a linear layer)."""
    from onnx import TensorProto, helper, numpy_helper
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["features", "W"], ["logits0"]),
         helper.make_node("Add", ["logits0", "B"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1)],
        "activity",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(W, "W"), numpy_helper.from_array(B, "B")])
    return _save(graph, path)


def classify(features: np.ndarray) -> np.ndarray:
    logits = features.astype(np.float32) @ W + B
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def write_anomaly(path: Path) -> Path:
    """reading [N, 8] float32 -> score [N, 1]: distance from a normal operating point."""
    from onnx import TensorProto, helper, numpy_helper
    graph = helper.make_graph(
        [helper.make_node("Sub", ["reading", "centre"], ["delta"]),
         helper.make_node("ReduceL2", ["delta"], ["score"], axes=[1], keepdims=1)],
        "anomaly",
        [helper.make_tensor_value_info("reading", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch", 1])],
        [numpy_helper.from_array(ANOMALY_CENTRE, "centre")])
    return _save(graph, path)


def anomaly_score(reading: np.ndarray) -> np.ndarray:
    return np.linalg.norm(reading.astype(np.float32) - ANOMALY_CENTRE, axis=-1, keepdims=True)


def write_typed(path: Path) -> Path:
    """ids [N, 3] int64, mask [N, 3] bool -> total [N, 1] int64: the sum of the ids the mask keeps (exact in int64,
    so a value that went through a float on its way would show)."""
    from onnx import TensorProto, helper, numpy_helper
    graph = helper.make_graph(
        [helper.make_node("Cast", ["mask"], ["keep"], to=TensorProto.INT64),
         helper.make_node("Mul", ["ids", "keep"], ["kept"]),
         helper.make_node("ReduceSum", ["kept", "axes"], ["total"], keepdims=1)],
        "typed",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 3]),
         helper.make_tensor_value_info("mask", TensorProto.BOOL, ["batch", 3])],
        [helper.make_tensor_value_info("total", TensorProto.INT64, ["batch", 1])],
        [numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")])
    return _save(graph, path)


TEXT_LABELS = ["ok", "flagged"]


def write_text_classifier(path: Path, flagged_words: list[str], size: int = 64) -> Path:
    """features [N, size] float32 (the appliance's ``hashed-words`` counts) -> probabilities [N, 2] over TEXT_LABELS:
    a linear layer whose only weights are on the buckets of ``flagged_words``, so a text holding one of them scores
    ~0.98 "flagged" and any other text ~0.02."""
    from onnx import TensorProto, helper, numpy_helper

    from appliance.tensors.features import hashed_words
    w = np.zeros((size, 2), dtype=np.float32)
    for word in flagged_words:
        w[int(np.argmax(hashed_words([word], size)[0])), 1] = 8.0
    b = np.array([2.0, -2.0], dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["features", "W"], ["logits0"]),
         helper.make_node("Add", ["logits0", "B"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1)],
        "moderation",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", size])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 2])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")])
    return _save(graph, path)


def text_classifier_entry(path: Path, size: int = 64, model_id: str = "guard") -> str:
    """The catalog entry (TOML) of a classifier ``write_text_classifier`` wrote at ``path``, as a moderation model."""
    from appliance.catalog import sha256_file
    return f'''
[[models]]
id = "{model_id}"
file = "{path.name}"
sha256 = "{sha256_file(path)}"
featurize = "hashed-words"

[[models.inputs]]
name = "features"
shape = [-1, {size}]

[[models.outputs]]
name = "probabilities"
labels = {json.dumps(TEXT_LABELS)}
'''


#: the tiny embedder's vocabulary (WordLevel: one id per word) and its token vectors, one row per id
EMBED_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "cat", "dog", "car", "red"]
EMBED_TABLE = np.array([[9, 9, 9], [0, 0, 1], [1, 0, 0], [0, 1, 0], [3, 0, 0], [2, 1, 0], [0, 0, 4], [0, 2, 2]],
                       dtype=np.float32)  # [PAD]'s row is large: it must never reach a vector


def write_embedder(path: Path, tokenizer_path: Path) -> tuple[Path, Path]:
    """A BERT-shaped embedder: input_ids, attention_mask [N, T] int64 -> last_hidden_state [N, T, 3], a plain
    lookup in EMBED_TABLE (the mask is an input, as BERT's is, and unused); and its tokenizer.json (lower-cased
    whitespace words, [CLS] text [SEP])."""
    from onnx import TensorProto, helper, numpy_helper
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["last_hidden_state"], axis=0),
         helper.make_node("Shape", ["attention_mask"], ["mask_shape"])],
        "embedder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "sequence", 3]),
         helper.make_tensor_value_info("mask_shape", TensorProto.INT64, [2])],
        [numpy_helper.from_array(EMBED_TABLE, "table")])
    _save(graph, path)
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(EMBED_VOCAB)}, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                             special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tokenizer.enable_truncation(max_length=4)  # as all-MiniLM's file says 128: the appliance must not obey it
    tokenizer.save(str(tokenizer_path))
    return path, tokenizer_path


def embed_reference(words: list[str]) -> np.ndarray:
    """What the appliance must answer for one text: the mean of [CLS], the words' rows and [SEP], unit length."""
    ids = [2, *(EMBED_VOCAB.index(w) if w in EMBED_VOCAB else 1 for w in words), 3]
    mean = EMBED_TABLE[ids].mean(axis=0)
    return mean / np.linalg.norm(mean)


def embedder_entry(path: Path, tokenizer_path: Path, max_tokens: int = 8, model_id: str = "tiny-embed") -> str:
    """The catalog entry of write_embedder's files (absolute paths)."""
    from appliance.catalog import sha256_file
    inputs = "".join(f'\n[[models.inputs]]\nname = "{n}"\ndtype = "int64"\nshape = ["batch", "sequence"]\n'
                     for n in ("input_ids", "attention_mask"))
    return (f'[[models]]\nid = "{model_id}"\nfile = "{path}"\nsha256 = "{sha256_file(path)}"\nrole = "embedder"\n'
            f'tokenizer = "{tokenizer_path}"\nmax_tokens = {max_tokens}\n{inputs}')

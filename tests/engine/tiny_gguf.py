"""A tiny llama-architecture GGUF with random weights, for a real engine in tests.

Two layers of width 64, a byte-level SentencePiece-style vocabulary (the 256
byte tokens, three specials, a few words): llama.cpp loads it and generates
(gibberish) in milliseconds on a CPU.  Written with the ``gguf`` package.
"""

from __future__ import annotations

from pathlib import Path

WIDTH = 64
LAYERS = 2
HEADS = 4
FFN = 128
CONTEXT = 256


def vocab() -> tuple[list[str], list[float], list[int]]:
    import gguf

    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    for w in ("\u2581the", "\u2581a", "\u2581hello", "\u2581world", "\u2581", "e", "t", "o"):
        tokens.append(w)
        types.append(gguf.TokenType.NORMAL)
    scores = [0.0] * 3 + [-1000.0] * 256 + [-float(i) for i in range(len(tokens) - 259)]
    return tokens, scores, [int(t) for t in types]


def write_tiny_gguf(path: Path, seed: int = 0) -> Path:
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)
    tokens, scores, types = vocab()
    n_vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-random-llama")
    w.add_context_length(CONTEXT)
    w.add_embedding_length(WIDTH)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(HEADS)
    w.add_rope_dimension_count(WIDTH // HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)

    def t(name: str, *shape: int) -> None:
        w.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))

    t("token_embd.weight", n_vocab, WIDTH)
    w.add_tensor("output_norm.weight", np.ones(WIDTH, dtype=np.float32))
    t("output.weight", n_vocab, WIDTH)
    for i in range(LAYERS):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(WIDTH, dtype=np.float32))
        for proj in ("attn_q", "attn_k", "attn_v", "attn_output"):
            t(f"blk.{i}.{proj}.weight", WIDTH, WIDTH)
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(WIDTH, dtype=np.float32))
        t(f"blk.{i}.ffn_gate.weight", FFN, WIDTH)
        t(f"blk.{i}.ffn_up.weight", FFN, WIDTH)
        t(f"blk.{i}.ffn_down.weight", WIDTH, FFN)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path

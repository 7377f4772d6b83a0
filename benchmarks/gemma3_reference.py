"""Independent reference figures for Gemma 3 270M (GGUF) using PyTorch + Hugging Face transformers.

This script does NOT use the `jq` library. It runs in a separate Python environment that has CPU
PyTorch, transformers (with its GGUF loader), gguf, accelerate, sentencepiece, protobuf and numpy:

    python3 -m venv /work/refenv
    /work/refenv/bin/pip install torch --index-url https://download.pytorch.org/whl/cpu
    /work/refenv/bin/pip install transformers accelerate gguf sentencepiece protobuf numpy
    /work/refenv/bin/python benchmarks/gemma3_reference.py --gguf /tmp/gemma/gemma.gguf

What it measures (all in float32, eager attention, CPU):

* The model and tokenizer are read with transformers' own GGUF support
  (`from_pretrained(dir, gguf_file=...)`); transformers dequantizes every GGUF tensor to float32 and,
  for Gemma-family models, subtracts 1 from every `*norm.weight` (llama.cpp's converter stores
  Gemma RMSNorm weights as 1 + w).  The script records raw GGUF values and the loaded values of a few
  norm weights so this can be checked.
* Perplexity protocol: the whole text is read as UTF-8 and tokenized without special tokens.  It is cut
  into consecutive, non-overlapping chunks of `--window-tokens` (511) text tokens; each window's input
  is [BOS] + chunk (512 ids).  The logits at positions 0..510 predict the tokens at positions 1..511;
  the window's loss is the mean cross-entropy of those 511 predictions.  Perplexity over the first N
  windows = exp(mean NLL over all N*511 predicted tokens).  Reported for N = 16 and for N = `--windows`.
* Reference tensors for a layer-by-layer parity check on the first window truncated to BOS + 63 text
  tokens (64 ids): final logits, transformers' `output_hidden_states` tuple (index 0 = scaled
  embedding, 1..17 = outputs of layers 0..16, 18 = output of layer 17 AFTER the final norm, because
  transformers ties the last entry to `last_hidden_state`), and the raw outputs of all 18 decoder
  layers captured with forward hooks (before the final norm).
* A greedy generation sanity check (20 new tokens after BOS + prompt).

Outputs: a JSON file of results, an .npy of the token ids of the whole text, and an .npz of tensors.
"""

import argparse
import json
import math
import os
import platform
import sys
import time

# benchmarks/ holds modules (e.g. kernels.py) whose names clash with packages transformers imports
# (the `kernels` hub package); drop this script's folder from the import path.
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]

import numpy as np  # noqa: E402


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", default="/tmp/gemma/gemma.gguf", help="path of the Gemma 3 270M GGUF file")
    ap.add_argument("--text", default="/work/shared/data/austen/persuasion.txt", help="UTF-8 text to score")
    ap.add_argument("--window-tokens", type=int, default=511, help="text tokens per window (BOS is added)")
    ap.add_argument("--windows", type=int, default=64, help="number of windows to score (>= 16)")
    ap.add_argument("--report-windows", type=int, default=16, help="also report perplexity over this many")
    ap.add_argument("--parity-tokens", type=int, default=64, help="length (incl. BOS) of the parity slice")
    ap.add_argument("--prompt", default="It was a truth universally acknowledged")
    ap.add_argument("--gen-tokens", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--out-json", default="benchmarks/results/gemma3_reference.json")
    ap.add_argument("--out-ids", default="/work/refdata/persuasion_ids_hf.npy")
    ap.add_argument("--out-npz", default="/work/refdata/gemma3_ref.npz")
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F
    import transformers
    import gguf
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    t_start = time.time()
    gguf_dir, gguf_name = os.path.split(os.path.abspath(args.gguf))

    # --- raw GGUF view (independent of transformers) -------------------------------------------
    probe_gguf = ["blk.0.attn_norm.weight", "blk.0.attn_q_norm.weight", "output_norm.weight"]
    reader = GGUFReader(args.gguf)
    gguf_names = [t.name for t in reader.tensors]
    gguf_types = {t.name: t.tensor_type.name for t in reader.tensors}
    raw_first8 = {}
    for t in reader.tensors:
        if t.name in probe_gguf:
            raw_first8[t.name] = np.asarray(t.data, dtype=np.float32).reshape(-1)[:8].tolist()
    del reader

    # --- transformers load ------------------------------------------------------------------------
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=gguf_name, dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    load_s = time.time() - t0
    sd = model.state_dict()
    probe_hf = {
        "blk.0.attn_norm.weight": "model.layers.0.input_layernorm.weight",
        "blk.0.attn_q_norm.weight": "model.layers.0.self_attn.q_norm.weight",
        "output_norm.weight": "model.norm.weight",
    }
    hf_first8 = {k: sd[v][:8].tolist() for k, v in probe_hf.items()}
    sd_names = list(sd.keys())
    bos = tok.bos_token_id
    cfg = model.config

    # --- tokenization -----------------------------------------------------------------------------
    with open(args.text, encoding="utf-8") as f:
        text = f.read()
    t0 = time.time()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    tok_s = time.time() - t0
    ids = np.asarray(ids, dtype=np.int32)
    os.makedirs(os.path.dirname(os.path.abspath(args.out_ids)), exist_ok=True)
    np.save(args.out_ids, ids)
    roundtrip_ok = tok.decode(ids.tolist()) == text

    W = args.window_tokens
    n_avail = len(ids) // W
    n_win = min(args.windows, n_avail)

    def window(i):
        return torch.tensor([[bos] + ids[i * W:(i + 1) * W].tolist()], dtype=torch.long)

    # --- parity slice -----------------------------------------------------------------------------
    P = args.parity_tokens
    x = window(0)[:, :P]
    layer_out = {}

    def hook(idx):
        def fn(_m, _inp, out):
            h = out[0] if isinstance(out, (tuple, list)) else out
            layer_out[idx] = h.detach()[0].float().numpy().copy()
        return fn

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(model.model.layers)]
    with torch.inference_mode():
        out = model(x, output_hidden_states=True, use_cache=False)
    for h in handles:
        h.remove()
    parity_logits = out.logits[0].float().numpy()
    hs = np.stack([h[0].float().numpy() for h in out.hidden_states])  # [19, P, 640]
    layers = np.stack([layer_out[i] for i in range(len(model.model.layers))])  # [18, P, 640]

    # --- perplexity windows -----------------------------------------------------------------------
    nll_sum = []
    t0 = time.time()
    with torch.inference_mode():
        for i in range(n_win):
            xi = window(i)
            logits = model(xi, use_cache=False).logits[0].float()
            nll = F.cross_entropy(logits[:-1], xi[0, 1:], reduction="sum").item()
            nll_sum.append(nll)
            if (i + 1) % 8 == 0 or i + 1 == n_win:
                m = sum(nll_sum) / ((i + 1) * W)
                print(f"window {i + 1}/{n_win}: running ppl {math.exp(m):.4f} ({time.time() - t0:.1f}s)",
                      flush=True)
    ppl_s = time.time() - t0
    nll_mean = [s / W for s in nll_sum]
    R = min(args.report_windows, n_win)
    ppl_r = math.exp(sum(nll_sum[:R]) / (R * W))
    ppl_n = math.exp(sum(nll_sum) / (n_win * W))

    # --- greedy generation ------------------------------------------------------------------------
    t0 = time.time()
    penc = tok(args.prompt, add_special_tokens=False)["input_ids"]
    pids = torch.tensor([[bos] + penc], dtype=torch.long)
    with torch.inference_mode():
        g = model.generate(pids, max_new_tokens=args.gen_tokens, do_sample=False,
                           num_beams=1, pad_token_id=tok.pad_token_id)
    new_ids = g[0, pids.shape[1]:].tolist()
    gen_text = tok.decode(new_ids, skip_special_tokens=False)
    gen_s = time.time() - t0

    # --- save tensors -----------------------------------------------------------------------------
    os.makedirs(os.path.dirname(os.path.abspath(args.out_npz)), exist_ok=True)
    np.savez(
        args.out_npz,
        input_ids=x[0].numpy().astype(np.int32),
        logits=parity_logits.astype(np.float32),
        hidden_states=hs.astype(np.float32),
        layer_outputs=layers.astype(np.float32),
        window_nll=np.asarray(nll_mean[:R], dtype=np.float64),
        window_nll_all=np.asarray(nll_mean, dtype=np.float64),
        gguf_tensor_names=np.asarray(gguf_names),
        state_dict_names=np.asarray(sd_names),
        probe_gguf_names=np.asarray(probe_gguf),
        probe_hf_names=np.asarray([probe_hf[k] for k in probe_gguf]),
        probe_raw_gguf_first8=np.asarray([raw_first8[k] for k in probe_gguf], dtype=np.float32),
        probe_hf_first8=np.asarray([hf_first8[k] for k in probe_gguf], dtype=np.float32),
        gen_prompt_ids=pids[0].numpy().astype(np.int32),
        gen_new_ids=np.asarray(new_ids, dtype=np.int32),
    )

    res = {
        "model": "Gemma 3 270M base, GGUF Q4_K_M",
        "gguf": os.path.abspath(args.gguf),
        "gguf_bytes": os.path.getsize(args.gguf),
        "text": os.path.abspath(args.text),
        "text_chars": len(text),
        "text_tokens": int(len(ids)),
        "tokenizer_roundtrip_exact": bool(roundtrip_ok),
        "first_ids": ids[:16].tolist(),
        "bos_id": bos,
        "windows_available": n_avail,
        "window_tokens": W,
        f"perplexity_{R}_windows": ppl_r,
        f"mean_nll_{R}_windows": sum(nll_sum[:R]) / (R * W),
        f"perplexity_{n_win}_windows": ppl_n,
        f"mean_nll_{n_win}_windows": sum(nll_sum) / (n_win * W),
        "windows_scored": n_win,
        "window_mean_nll": nll_mean,
        "protocol": (
            f"Read the text as UTF-8; tokenize the whole text with the GGUF's tokenizer as converted by "
            f"transformers, without special tokens. Split into consecutive non-overlapping chunks of {W} "
            f"text tokens (a trailing partial chunk is never used). Each window's input is [BOS={bos}] + "
            f"chunk ({W + 1} ids), one forward pass, no cache, float32, eager attention. The logits at "
            f"positions 0..{W - 1} predict tokens at positions 1..{W}; NLL = cross-entropy with natural log. "
            f"Perplexity over the first N windows = exp(sum of NLL / (N*{W})). "
            f"Sliding window {cfg.sliding_window} (HF mask: kv_idx > q_idx - window) never binds for "
            f"{W + 1}-token windows."
        ),
        "parity_slice": {
            "tokens": P,
            "npz": os.path.abspath(args.out_npz),
            "hidden_states_note": "index 0 = embedding * sqrt(640) (float32); 1..17 = outputs of layers "
                                  "0..16; 18 = layer 17 output AFTER final norm (transformers ties it to "
                                  "last_hidden_state). layer_outputs[i] = raw output of decoder layer i "
                                  "(hook), so layer_outputs[17] is before the final norm.",
            "logits_first5_pos_last": parity_logits[-1, :5].tolist(),
            "argmax_per_position_first16": parity_logits.argmax(-1)[:16].tolist(),
        },
        "norm_weights": {
            "raw_gguf_first8": raw_first8,
            "transformers_state_dict_first8": hf_first8,
            "transformers_names": probe_hf,
            "note": "transformers' Gemma2TensorProcessor (used for gemma3) subtracts 1 from every "
                    "'*norm.weight' GGUF tensor; Gemma3RMSNorm then multiplies by (1 + w).",
        },
        "gguf_tensor_count": len(gguf_names),
        "gguf_tensor_type_counts": {t: sum(1 for v in gguf_types.values() if v == t)
                                    for t in sorted(set(gguf_types.values()))},
        "config": {
            "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_hidden_layers,
            "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
            "head_dim": cfg.head_dim, "intermediate_size": cfg.intermediate_size,
            "rms_norm_eps": cfg.rms_norm_eps, "sliding_window": cfg.sliding_window,
            "layer_types": list(cfg.layer_types),
            "rope_parameters": getattr(cfg, "rope_parameters", None),
            "query_pre_attn_scalar": cfg.query_pre_attn_scalar, "vocab_size": cfg.vocab_size,
            "tie_word_embeddings": cfg.tie_word_embeddings,
            "final_logit_softcapping": cfg.final_logit_softcapping,
            "attn_logit_softcapping": cfg.attn_logit_softcapping,
            "hidden_activation": cfg.hidden_activation,
        },
        "generation": {
            "prompt": args.prompt,
            "prompt_ids_with_bos": pids[0].tolist(),
            "new_token_ids": new_ids,
            "greedy_text": gen_text,
            "seconds": gen_s,
        },
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "gguf": getattr(gguf, "__version__", None) or _dist_version("gguf"),
            "numpy": np.__version__,
            "accelerate": _dist_version("accelerate"),
            "tokenizers": _dist_version("tokenizers"),
        },
        "cpu": cpu_name(),
        "torch_threads": torch.get_num_threads(),
        "timing_s": {"load": load_s, "tokenize": tok_s, "perplexity_windows": ppl_s,
                     "per_window": ppl_s / max(n_win, 1), "generation": gen_s,
                     "total": time.time() - t_start},
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out_json)), exist_ok=True)
    with open(args.out_json, "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps({k: res[k] for k in res if "perplexity" in k or k in ("text_tokens", "generation")},
                     indent=1))


def _dist_version(name):
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:
        return None


if __name__ == "__main__":
    main()

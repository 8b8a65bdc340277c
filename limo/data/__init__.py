"""Samples -> tokens -> packed micro-batches.

    sources.load_records(path, fmt)           LIMO / messages / alpaca records from .jsonl, .json, .parquet or a hub id
    chat.encode(sample, tokenizer, system)    (input_ids, labels) via the tokenizer's chat template
    dataset.resolve_tokenizer(data_cfg, model_path)   the tokenizer a run uses
    dataset.load_samples(data_cfg, tokenizer) (list[EncodedSample], DataReport): the training loop's entry point
    packing.pack / plan / build_step          packed streams, split over ranks by estimated compute
    loader.PackedLoader                       deterministic, rank-aware, resumable global batches
    synthetic                                 the demo's byte-level tokenizer and arithmetic problems
    python -m limo.data.inspect                    lengths, cutoff losses, packing and balance of a data set
"""

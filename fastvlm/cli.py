"""The ``fastvlm`` command line.

Subcommands:
  init OUT --like CKPT | --llm SIZE        a randomly initialised FastVLM checkpoint (to train from scratch)
  train --model M --data F --output-dir D  train / fine-tune (stage presets; DDP/FSDP under torchrun)
  data synth --out DIR --num N             synthetic image-question-answer data (LLaVA format)
  data check FILE [--image-root DIR]       read a LLaVA-format data file and report bad records
  data score --model M FILE                exact-match accuracy of greedy answers (synthetic sets)
  bench [--quick]                          the paper's efficiency study: encoders, resolutions, LLMs, TTFT, plots
  predict --model M --image F --prompt P   answer a question about an image (streams; --json for details)
  chat --model M [--image F]               an interactive conversation about an image
  convert SRC DST --format F               rewrite a FastVLM checkpoint folder (fastvlm, apple or hf format)
  info PATH                         layout, form, architecture and size of a tower checkpoint
  convert-tower SRC DST --layout L  rewrite a tower checkpoint in another layout (optionally re-parameterised)
  bench-train                       training throughput of a FastVLM-sized model (samples/s; also benchmarks/)
  bench-encoder                     FastViTHD latency, unfused vs fused (also benchmarks/encoder_latency.py)

User errors (bad paths, bad checkpoints) print one clear line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from dataclasses import fields
from pathlib import Path

import torch

from fastvlm.processing import DEFAULT_MAX_PIXELS, load_image


class CLIError(Exception):
    """An error caused by the user's input: reported as one line, without a traceback."""


# ------------------------------------------------------------------------------ helpers


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description() -> dict:
    info = {
        "torch": torch.__version__,
        "cpu": _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _print_benchmark(title: str, table: str, rows: list, meta: dict, json_path: str | None) -> None:
    """Title line with the machine, the markdown table, and the rows as JSON when asked."""
    from fastvlm.measure import write_rows_json

    print(f"\n{title}; {_machine_line(meta)}")
    print(table)
    if json_path:
        write_rows_json(rows, json_path, meta)
        print(f"wrote {json_path}")


def _machine_line(meta: dict) -> str:
    """'CPU, N threads, torch V[, GPU]' for benchmark headers."""
    gpu = f", {meta['gpu']}" if "gpu" in meta else ""
    return f"{meta['cpu']}, {meta['cpu_threads']} threads, torch {meta['torch']}{gpu}"


# ------------------------------------------------------------------------------ commands


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _check_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise CLIError(f"unknown device {device!r}; expected cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"device {device!r} was asked for, but this torch build sees no CUDA device")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise CLIError("device 'mps' was asked for, but it is not available here")
    return dev


def _check_resolutions(resolutions: list[int]) -> None:
    for r in resolutions:
        if r <= 0 or r % 64:
            raise CLIError(f"resolution {r} is not a positive multiple of 64 (the FastViTHD stride)")


def _bench_devices(requested: list[str] | None) -> list[str]:
    devices = requested or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    for device in devices:
        _check_device(device)
    return devices


def _load_model(args: argparse.Namespace):
    from fastvlm.model import FastVLM

    _check_device(args.device)
    model = FastVLM.from_pretrained(
        args.model, device=args.device, dtype=_DTYPES[args.dtype], image_mode=args.image_mode
    )
    if args.allow_large_images:
        model.image_processor.max_pixels = None
    if model.tokenizer is None:
        raise CLIError(f"{args.model} has no tokenizer files; predict and chat need one")
    return model


def _generation_kwargs(args: argparse.Namespace) -> dict:
    return {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
    }


def cmd_predict(args: argparse.Namespace) -> None:
    image = None
    if args.image is not None:  # decode (and reject a bad image) before spending time on the model
        image = load_image(args.image, max_pixels=None if args.allow_large_images else DEFAULT_MAX_PIXELS)
    model = _load_model(args)
    if args.json:
        result = model.generate(image=image, prompt=args.prompt, **_generation_kwargs(args))
        print(
            json.dumps(
                {
                    "text": result.text,
                    "token_ids": result.token_ids,
                    "finish_reason": result.finish_reason,
                    "timings": result.timings.as_dict(),
                },
                indent=2,
            )
        )
        return
    stream = model.generate(image=image, prompt=args.prompt, stream=True, **_generation_kwargs(args))
    for piece in stream:
        print(piece, end="", flush=True)
    print()
    t = stream.result.timings
    print(
        f"[vision {t.vision_ms:.0f} ms, prefill {t.prefill_ms:.0f} ms, TTFT {t.ttft_ms:.0f} ms, "
        f"{t.decode_tokens_per_s:.1f} tokens/s]",
        file=sys.stderr,
    )


def cmd_chat(args: argparse.Namespace) -> None:
    model = _load_model(args)
    session = model.chat(args.image)
    print("Chat about the image; an empty line, 'exit' or Ctrl-D ends.", file=sys.stderr)
    while True:
        try:
            question = input("you> ").strip()
        except EOFError:
            break
        if not question or question in ("exit", "quit"):
            break
        print("fastvlm> ", end="", flush=True)
        try:
            for piece in session.ask(question, stream=True, **_generation_kwargs(args)):
                print(piece, end="", flush=True)
        except ValueError as err:  # e.g. the conversation outgrew the context: say so, keep the session
            print(f"\n[error: {err}]", file=sys.stderr)
            continue
        print()


def cmd_convert(args: argparse.Namespace) -> None:
    from fastvlm.model import FastVLM

    dst = Path(args.dst)
    if dst.exists() and not args.overwrite:
        raise CLIError(f"{dst} exists; pass --overwrite to replace the checkpoint files in it")
    model = FastVLM.from_pretrained(args.src, fuse=False, dtype=_DTYPES[args.dtype] if args.dtype else None)
    model.save_pretrained(dst, format=args.format, overwrite=args.overwrite)
    print(f"wrote {dst} in the {args.format} format")


def cmd_info(args: argparse.Namespace) -> None:
    from fastvlm.checkpoints import detect_tower_layout, extract_tower_state_dict, read_state_dict
    from fastvlm.vision import FastViT

    state_dict = read_state_dict(args.path)
    tensors, prefix = extract_tower_state_dict(state_dict)
    layout = detect_tower_layout(tensors)
    model = FastViT.from_state_dict(state_dict, device="meta")
    cfg = model.config
    report = {
        "layout": layout,
        "prefix": prefix,
        "form": "inference" if cfg.inference_mode else "training",
        "parameters": model.num_parameters(),
        "config": cfg.to_dict(),
        "has_clip_head": "head.proj" in tensors,
    }
    print(json.dumps(report, indent=2))


def cmd_convert_tower(args: argparse.Namespace) -> None:
    from fastvlm.checkpoints import (
        convert_tower_state_dict,
        extract_tower_state_dict,
        read_state_dict,
        save_safetensors_atomic,
    )
    from fastvlm.vision import FastViT

    src, dst = Path(args.src), Path(args.dst)
    if dst.exists() and not args.overwrite:
        raise CLIError(f"{dst} exists; pass --overwrite to replace it")
    if dst.suffix != ".safetensors":
        raise CLIError(f"output must be a .safetensors file, got {dst}")
    state_dict = read_state_dict(src)
    if args.reparameterize:
        head = extract_tower_state_dict(state_dict)[0].get("head.proj")
        state_dict = FastViT.from_state_dict(state_dict, dtype=None).reparameterize().state_dict()
        if head is not None:  # the unused CLIP head travels along unchanged
            state_dict["head.proj"] = head
    out = convert_tower_state_dict(state_dict, args.layout, prefix=args.prefix)
    save_safetensors_atomic(out, dst, metadata={"format": "pt", "fastvlm_tower_layout": args.layout})
    print(f"wrote {len(out)} tensors in the {args.layout} layout to {dst}")


def cmd_bench_encoder(args: argparse.Namespace) -> None:
    from fastvlm.bench.encoder import format_table, run_encoder_benchmark

    if args.threads:
        torch.set_num_threads(args.threads)
    devices = _bench_devices(args.device)
    resolutions = args.resolutions or ([256, 512] if args.quick else [256, 512, 1024])
    repeats = args.repeats or (3 if args.quick else 5)
    _check_resolutions(resolutions)
    dtype = _DTYPES.get(args.fused_dtype)  # "auto": None, chosen per device
    rows = run_encoder_benchmark(
        resolutions, devices, batch=args.batch, repeats=repeats, warmup=args.warmup, fused_dtype=dtype
    )
    meta = machine_description() | {"repeats": repeats, "warmup": args.warmup}
    title = f"FastViTHD, random weights, batch {args.batch}; median of {repeats} interleaved calls after "
    _print_benchmark(title + f"{args.warmup} warm-up", format_table(rows), rows, meta, args.json)


def cmd_data_synth(args: argparse.Namespace) -> None:
    from fastvlm.train.synth import write_synthetic_dataset

    files = write_synthetic_dataset(args.out, args.num, size=args.size, seed=args.seed,
                                    test_fraction=args.test_fraction, binding=args.binding)  # fmt: skip
    print(f"wrote {args.num} examples: {files['train']}, {files['test']} and {Path(args.out) / 'images'}")


def cmd_data_check(args: argparse.Namespace) -> None:
    from fastvlm.train.data import ReadReport, iter_records

    report = ReadReport()
    for _ in iter_records(args.path, image_root=args.image_root, report=report, strict=args.strict):
        pass
    print(f"{report.read} usable records, {len(report.skipped)} skipped")
    for line in report.skipped[: args.show]:
        print(f"  skipped {line}")
    if len(report.skipped) > args.show:
        print(f"  … and {len(report.skipped) - args.show} more")


def cmd_data_score(args: argparse.Namespace) -> None:
    from fastvlm.train.synth import exact_match

    model = _load_model(args)
    result = exact_match(model, args.path, batch_size=args.batch_size)
    kinds = ", ".join(f"{k} {v:.1%}" for k, v in result["by_kind"].items())
    print(f"exact match {result['accuracy']:.1%} on {result['n']} records ({kinds})")
    for rid, expected, got in result["errors"][: args.show]:
        print(f"  {rid}: expected {expected!r}, got {got!r}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


def _eval_task_names(spec: str) -> list[str]:
    """'all' or 'a,b,...' as a list of known task names."""
    from fastvlm.eval import TASKS

    names = list(TASKS) if spec == "all" else [t.strip() for t in spec.split(",") if t.strip()]
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise CLIError(f"unknown task(s) {unknown}; known tasks: {', '.join(TASKS)}")
    return names


def cmd_eval(args: argparse.Namespace) -> None:
    from fastvlm.eval import TASKS, evaluate

    if args.task and args.tasks:
        raise CLIError("pass --task NAME (with --data the task's folder) or --tasks, not both")
    if not args.task and not args.tasks:
        raise CLIError(f"pass --task NAME or --tasks all|NAME,NAME...; tasks: {', '.join(TASKS)}")
    data = Path(args.data)
    if args.task:
        runs = [(args.task, data)]
    else:  # --data is a parent folder with one sub-folder per task
        names = _eval_task_names(args.tasks)
        runs = [(n, data / n) for n in names if (data / n).is_dir()]
        skipped = [n for n in names if not (data / n).is_dir()]
        if skipped:
            print(f"no data folder for {', '.join(skipped)} under {data}; skipped", file=sys.stderr)
        if not runs:
            raise CLIError(f"{data} has no sub-folder named after a task ({', '.join(names)})")
    if args.task and args.task not in TASKS:
        raise CLIError(f"unknown task {args.task!r}; known tasks: {', '.join(TASKS)}")
    for name, folder in runs:  # a wrong folder is reported before the model is loaded
        TASKS[name].layout_for(folder)
    model = _load_model(args)
    for name, folder in runs:
        r = evaluate(model, name, folder, args.out, limit=args.limit, batch_size=args.batch_size,
                     max_new_tokens=args.max_new_tokens, overwrite=args.overwrite, model_name=args.model)  # fmt: skip
        speed = r["throughput"]["samples_per_s"]
        speed_text = f", {speed:.2f} samples/s" if speed else ""
        errors = f", {r['errors']} failed samples (see predictions.jsonl)" if r["errors"] else ""
        print(f"{r['title']}: {r['metric']} {100 * r['score']:.2f} on {r['n']} samples{speed_text}{errors}")
    print(f"results: {Path(args.out) / 'results.md'}")


def cmd_eval_rescore(args: argparse.Namespace) -> None:
    from fastvlm.eval import rescore

    out = Path(args.out)
    names = _eval_task_names(args.tasks)
    found = [n for n in names if (out / n / "predictions.jsonl").exists()]
    if not found:
        raise CLIError(f"{out} has no <task>/predictions.jsonl for {', '.join(names)}")
    for name in found:
        r = rescore(out, name)
        print(f"{r['title']}: {r['metric']} {100 * r['score']:.2f} on {r['n']} samples")
    print(f"results: {out / 'results.md'}")


def cmd_init(args: argparse.Namespace) -> None:
    from fastvlm.model import FastVLM, fastvlm_config

    if args.like:
        source = FastVLM.from_pretrained(args.like, fuse=False)
        config, tokenizer = source.config, source.tokenizer
        del source
    else:
        from transformers import AutoTokenizer

        if not args.tokenizer:
            raise CLIError("--llm needs --tokenizer (a folder or hub id), e.g. Qwen/Qwen2-0.5B-Instruct")
        config = fastvlm_config(args.llm, image_size=args.image_size or 1024)
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        if len(tokenizer) > config.text.vocab_size:
            raise CLIError(f"the tokenizer has {len(tokenizer)} tokens, more than the LLM's {config.text.vocab_size}")
    config.vision = config.vision.replace(inference_mode=args.tower_form == "inference")
    sizes = {"hidden_size": args.hidden_size, "num_hidden_layers": args.layers, "num_attention_heads": args.heads,
             "num_key_value_heads": args.kv_heads, "intermediate_size": args.intermediate_size}  # fmt: skip
    sizes = {k: v for k, v in sizes.items() if v is not None}
    if sizes:
        from transformers import Qwen2Config

        text = {**config.text.to_dict(), **sizes}
        text.pop("head_dim", None)  # derived from hidden_size / heads
        if (
            text["hidden_size"] % text["num_attention_heads"]
            or text["num_attention_heads"] % text["num_key_value_heads"]
        ):
            raise CLIError("--hidden-size must divide by --heads, and --heads by --kv-heads")
        text["layer_types"] = ["full_attention"] * text["num_hidden_layers"]
        config.text = Qwen2Config(**text)
    if args.image_size:
        if args.image_size % config.vision.stride:
            raise CLIError(f"--image-size must be a multiple of the tower's stride {config.vision.stride}")
        config.image_size = args.image_size
    model = FastVLM.from_config(config, seed=args.seed)
    model.tokenizer = tokenizer
    path = model.save_pretrained(args.out, overwrite=args.overwrite)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"wrote a randomly initialised FastVLM ({params:.1f}M parameters, {config.image_size} px) to {path}")


def cmd_train(args: argparse.Namespace) -> None:
    from fastvlm.train.config import TrainConfig, make_config
    from fastvlm.train.trainer import train

    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if f.name not in ("extra", "stage")}
    config = make_config(stage=args.stage, file=args.config, **overrides)
    result = train(config, resume=args.resume, overwrite=args.overwrite)
    if result.final_model is not None and int(os.environ.get("RANK", "0")) == 0:
        last = result.losses.get(result.steps)
        loss = f", final loss {last:.4f}" if last is not None else ""
        print(f"trained {result.steps} steps{loss}; model written to {result.final_model}")
        if result.skipped:
            print(f"{len(result.skipped)} record(s) were skipped; see {Path(config.output_dir) / 'log.jsonl'}")


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field; unset flags keep the preset or config-file value."""
    from fastvlm.train.config import HELP, STAGES, TrainConfig

    p.add_argument("--config", help="a .json or .toml file of settings (flags override it)")
    p.add_argument(
        "--resume", nargs="?", const="latest", default=False,
        help="continue from the latest checkpoint in --output-dir, or from the given checkpoint folder",
    )  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace a previous run in --output-dir")
    choices = {"stage": list(STAGES), "precision": ["auto", "fp32", "bf16"], "strategy": ["ddp", "fsdp"],
               "tower_batchnorm": ["auto", "frozen", "train"]}  # fmt: skip
    for f in fields(TrainConfig):
        if f.name == "extra":
            continue
        flag, default = "--" + f.name.replace("_", "-"), f.default
        kwargs: dict = {"help": HELP[f.name], "default": None}
        if f.name in choices:
            kwargs["choices"] = choices[f.name]
        elif isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif isinstance(default, tuple) or f.name in ("train", "lora_targets", "adam_betas"):
            kwargs["nargs"] = "+"
            kwargs["type"] = float if f.name == "adam_betas" else str
        elif f.name in ("tower_lr", "grad_clip") or isinstance(default, float):
            kwargs["type"] = float
        elif f.name in ("max_steps", "max_length", "image_size") or isinstance(default, int):
            kwargs["type"] = int
        p.add_argument(flag, **kwargs)


def cmd_bench_train(args: argparse.Namespace) -> None:
    from fastvlm.bench.train import format_train_table, measure_training_step

    if args.threads:
        torch.set_num_threads(args.threads)
    _check_resolutions(args.resolutions)
    rows = []
    for device in _bench_devices(args.device):
        for px in args.resolutions:
            for stage in args.stages:
                rows += measure_training_step(
                    args.llm, px, stage=stage, micro_batch=args.micro_batch, steps=args.steps, device=device,
                    baseline=not args.no_baseline, progress=True,
                )  # fmt: skip
    meta = machine_description()
    title = f"Training step of FastVLM-{args.llm.upper()} (random weights, fp32 master weights), one process; "
    _print_benchmark(title + f"median of {args.steps} steps after a warm-up", format_train_table(rows), rows, meta,
                     args.json)  # fmt: skip


def cmd_bench_eval(args: argparse.Namespace) -> None:
    from fastvlm.bench.eval_speed import format_eval_table, measure_eval_throughput

    if args.threads:
        torch.set_num_threads(args.threads)
    _check_resolutions(args.resolutions)
    if args.samples < 1 or args.max_new_tokens < 1 or any(b < 1 for b in args.batch_sizes):
        raise CLIError("--samples, --max-new-tokens and every --batch-sizes value must be at least 1")
    batches = tuple(dict.fromkeys([1, *args.batch_sizes]))  # batch 1 is the baseline
    rows = []
    for device in _bench_devices(args.device):
        for px in args.resolutions:
            rows += measure_eval_throughput(
                args.llm,
                px,
                samples=args.samples,
                batch_sizes=batches,
                max_new_tokens=args.max_new_tokens,
                device=device,
                progress=True,
            )
    title = f"fastvlm eval (GQA layout, synthetic images) with FastVLM-{args.llm.upper()}, random weights, greedy"
    _print_benchmark(title, format_eval_table(rows), rows, machine_description(), args.json)


def cmd_bench(args: argparse.Namespace) -> None:
    from fastvlm.bench.report import markdown_report, write_report
    from fastvlm.bench.study import (
        DEFAULT_ENCODERS,
        DEFAULT_RESOLUTIONS,
        LLM_NAMES,
        QUICK_ENCODERS,
        QUICK_RESOLUTIONS,
        run_study,
    )

    if args.threads:
        torch.set_num_threads(args.threads)
    encoders = args.encoders or (QUICK_ENCODERS if args.quick else DEFAULT_ENCODERS)
    resolutions = args.resolutions or (QUICK_RESOLUTIONS if args.quick else DEFAULT_RESOLUTIONS)
    llms = args.llms if args.llms is not None else (["qwen2-0.5b"] if args.quick else LLM_NAMES)
    repeats = args.repeats or (1 if args.quick else 3)
    if any(r < 64 for r in resolutions) or repeats < 1:
        raise CLIError("resolutions must be at least 64 px and --repeats at least 1")
    device = args.device
    _check_device(device)
    results = run_study(encoders, resolutions, llms, device=device, dtype=_DTYPES[args.dtype],
                        llm_dtype=_DTYPES[args.llm_dtype] if args.llm_dtype else None, repeats=repeats,
                        tiling=args.tiling, meta=machine_description())  # fmt: skip
    out = Path(args.out)
    files = write_report(results, out)
    print(markdown_report(results))
    print("wrote " + ", ".join(str(f) for f in files))


def cmd_bench_ttft(args: argparse.Namespace) -> None:
    from fastvlm.bench.ttft import format_ttft_table, run_ttft_benchmark

    if args.threads:
        torch.set_num_threads(args.threads)
    _check_resolutions(args.resolutions)
    if args.repeats < 1 or args.new_tokens < 2:
        raise CLIError("--repeats must be at least 1 and --new-tokens at least 2")
    devices = _bench_devices(args.device)
    rows = []
    for device in devices:
        dtype = _DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device == "cuda" else torch.float32)
        rows += run_ttft_benchmark(
            args.resolutions,
            llm=args.llm,
            device=device,
            dtype=dtype,
            text_tokens=args.text_tokens,
            new_tokens=args.new_tokens,
            repeats=args.repeats,
        )
    meta = machine_description() | {
        "repeats": args.repeats,
        "text_tokens": args.text_tokens,
        "new_tokens": args.new_tokens,
    }
    title = f"FastVLM-{args.llm.upper()} (FastViTHD fused + Qwen2-{args.llm.upper()}), random weights, batch 1; "
    _print_benchmark(title + f"median of {args.repeats} runs after a warm-up", format_ttft_table(rows), rows, meta,
                     args.json)  # fmt: skip


# ------------------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastvlm", description="FastVLM: fast vision-language inference.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("predict", help="answer a question about an image")
    _add_model_arguments(p)
    p.add_argument("--image", help="image file (omit for a text-only prompt)")
    p.add_argument("--prompt", required=True, help="the question, or a full qwen_2 prompt with <image>")
    p.add_argument("--json", action="store_true", help="print text, token ids and timings as JSON")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("chat", help="an interactive conversation about an image")
    _add_model_arguments(p)
    p.add_argument("--image", help="image file (omit for text-only chat)")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("convert", help="rewrite a FastVLM checkpoint folder in another format")
    p.add_argument("src", help="checkpoint folder or hub id (any format)")
    p.add_argument("dst", help="output folder")
    p.add_argument("--format", choices=["fastvlm", "apple", "hf"], required=True)
    p.add_argument("--dtype", choices=sorted(_DTYPES), help="cast the weights (default: keep them as stored)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("info", help="describe a vision-tower checkpoint (.safetensors or .bin)")
    p.add_argument("path")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("convert-tower", help="rewrite a vision-tower checkpoint in another key layout")
    p.add_argument("src", help="input .safetensors/.bin (any layout, prefixed or not)")
    p.add_argument("dst", help="output .safetensors")
    p.add_argument("--layout", choices=["fastvlm", "apple", "timm"], required=True)
    p.add_argument("--prefix", action="store_true", help="add the prefix the tower has inside a full checkpoint")
    p.add_argument("--reparameterize", action="store_true", help="convert a training-form tower to the inference form")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_convert_tower)

    from fastvlm.bench.study import LLM_NAMES
    from fastvlm.bench.baselines import ENCODERS

    data = sub.add_parser("data", help="training data: synthetic sets, checks").add_subparsers(
        dest="data_command", required=True
    )
    p = data.add_parser("synth", help="write a synthetic image-question-answer set in LLaVA's format")
    p.add_argument("--out", required=True, help="folder for images/, train.jsonl and test.jsonl")
    p.add_argument("--num", type=int, default=1000)
    p.add_argument("--size", type=int, default=512, help="canvas side in px")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-fraction", type=float, default=0.1, help="share held out in test.jsonl")
    p.add_argument("--binding", action="store_true",
                   help="ask about one shape among several (harder: needs a larger model or a longer run)")  # fmt: skip
    p.set_defaults(func=cmd_data_synth)
    p = data.add_parser("check", help="read a LLaVA-format .json/.jsonl file and report records that cannot be used")
    p.add_argument("path")
    p.add_argument("--image-root", help="folder the records' image paths are relative to (default: the file's)")
    p.add_argument("--strict", action="store_true", help="fail (exit 2) at the first unusable record")
    p.add_argument("--show", type=int, default=20, help="how many skipped records to list")
    p.set_defaults(func=cmd_data_check)
    p = data.add_parser("score", help="exact-match accuracy of a model's greedy answers on a LLaVA-format file")
    _add_model_arguments(p)
    p.add_argument("path", help=".json/.jsonl whose first human turn is the question and first gpt turn the answer")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--show", type=int, default=10, help="how many wrong answers to list")
    p.add_argument("--json", help="also write the scores (and every wrong answer) to this file")
    p.set_defaults(func=cmd_data_score)

    p = sub.add_parser("eval", help="score a model on the paper's benchmarks from local copies of their data")
    _add_model_loading_arguments(p)
    p.add_argument("--task", help="one task; --data is then its folder")
    p.add_argument("--tasks", help="'all' or NAME,NAME...; --data is then a folder with one sub-folder per task")
    p.add_argument("--data", required=True, help="benchmark data folder (see README: Evaluation)")
    p.add_argument("--out", default="eval_results", help="predictions, results.json per task, results.md")
    p.add_argument("--limit", type=int, help="only the first N samples of each task")
    p.add_argument("--batch-size", type=int, help="samples per generate call (default: 1 on CPU, 8 on GPU)")
    p.add_argument("--max-new-tokens", type=int, help="default: the task protocol's own limit")
    p.add_argument("--overwrite", action="store_true", help="discard earlier predictions in --out")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("eval-rescore", help="score an eval run's predictions again (no model or data needed)")
    p.add_argument("--out", required=True, help="the --out folder of an earlier fastvlm eval")
    p.add_argument("--tasks", default="all", help="'all' (default) or NAME,NAME...")
    p.set_defaults(func=cmd_eval_rescore)

    p = sub.add_parser("init", help="write a randomly initialised FastVLM checkpoint (to train from scratch)")
    p.add_argument("out", help="folder to create")
    p.add_argument("--like", help="copy the architecture and tokenizer of this checkpoint (weights are not copied)")
    p.add_argument("--llm", choices=["0.5b", "1.5b", "7b"], default="0.5b", help="released architecture (no --like)")
    p.add_argument("--tokenizer", help="tokenizer folder or hub id (with --llm)")
    p.add_argument("--image-size", type=int, help="input resolution (a multiple of 64 for FastViTHD)")
    p.add_argument(
        "--tower-form", choices=["train", "inference"], default="train",
        help="train: the multi-branch form with batch norms that trains from scratch (default); inference: the "
        "re-parameterised form of released checkpoints",
    )  # fmt: skip
    p.add_argument("--hidden-size", type=int, help="change the LLM's width")
    p.add_argument("--layers", type=int, help="change the LLM's depth")
    p.add_argument("--heads", type=int, help="attention heads")
    p.add_argument("--kv-heads", type=int, help="key/value heads (grouped-query attention)")
    p.add_argument("--intermediate-size", type=int, help="MLP width")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser(
        "train",
        help="train or fine-tune (stage presets 1/1.5/2/3; run under torchrun for DDP/FSDP)",
        description="Train a FastVLM. Values come from the --stage preset, then --config, then flags. "
        "The same command runs under `torchrun --nproc-per-node N fastvlm train ...`.",
    )
    add_train_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("bench", help="the paper's efficiency study (encoders, resolutions, LLMs; tables and plots)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="FastViTHD vs ViT-L/14 vs ConvNeXt-L at 256/512/1024 px, Qwen2-0.5B prefill (a few minutes)",
    )
    p.add_argument("--encoders", nargs="+", choices=sorted(ENCODERS), help="default: all six")
    p.add_argument("--resolutions", type=int, nargs="+", help="input sides in px (default 256 512 768 1024)")
    p.add_argument(
        "--llms",
        nargs="*",
        choices=LLM_NAMES,
        help="decoders for TTFT (default: all four; 7B ones run in bf16 or are skipped when memory is short; "
        "pass no names for encoders only)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="fp32", help="encoder dtype")
    p.add_argument("--llm-dtype", choices=sorted(_DTYPES), help="default: fp32 (bf16 for 7B models and on GPU)")
    p.add_argument(
        "--tiling",
        action="store_true",
        help="also the paper's AnyRes: 2x2 tiles + a global view at twice the largest side",
    )
    p.add_argument("--repeats", type=int, help="timed runs after the warm-up (default 3; 1 with --quick)")
    p.add_argument("--threads", type=int)
    p.add_argument("--out", default="results/bench", help="folder for results.json, results.md and the plots")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("bench-ttft", help="TTFT of a FastVLM-sized model (random weights) by resolution")
    p.add_argument("--resolutions", type=int, nargs="+", default=[256, 512, 768, 1024])
    p.add_argument("--llm", choices=["0.5b", "1.5b", "7b"], default="0.5b")
    p.add_argument("--device", nargs="+", choices=["cpu", "cuda"], help="default: cpu, and cuda when present")
    p.add_argument("--dtype", choices=sorted(_DTYPES), help="default: fp32 on CPU, bf16 on GPU")
    p.add_argument("--text-tokens", type=int, default=40, help="text tokens around the image (template + question)")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens decoded to measure decode speed")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int)
    p.add_argument("--json", help="also write the rows and machine description to this JSON file")
    p.set_defaults(func=cmd_bench_ttft)

    p = sub.add_parser("bench-train", help="training throughput (samples/s) of a FastVLM-sized model, by stage")
    p.add_argument("--llm", choices=["0.5b", "1.5b", "7b"], default="0.5b")
    p.add_argument("--resolutions", type=int, nargs="+", default=[1024])
    p.add_argument("--stages", nargs="+", choices=["1", "1.5", "2", "3"], default=["1"])
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=2, help="timed steps (after one warm-up step)")
    p.add_argument("--device", nargs="+", choices=["cpu", "cuda"], help="default: cpu, and cuda when present")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-baseline", action="store_true", help="skip the full-logits baseline rows")
    p.add_argument("--json", help="also write the rows and machine description to this JSON file")
    p.set_defaults(func=cmd_bench_train)

    p = sub.add_parser("bench-eval", help="evaluation throughput (samples/s) of a FastVLM-sized model, by batch size")
    p.add_argument("--llm", choices=["0.5b", "1.5b", "7b"], default="0.5b")
    p.add_argument("--resolutions", type=int, nargs="+", default=[1024])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[8], help="compared with batch size 1")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--device", nargs="+", choices=["cpu", "cuda"], help="default: cpu, and cuda when present")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", help="also write the rows and machine description to this JSON file")
    p.set_defaults(func=cmd_bench_eval)

    p = sub.add_parser("bench-encoder", help="FastViTHD latency: released inference form vs our fused form")
    add_bench_encoder_arguments(p)
    p.set_defaults(func=cmd_bench_encoder)
    return parser


def _add_model_loading_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint folder (authors', transformers' or ours) or hub id")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps ...")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="fp32")
    p.add_argument("--image-mode", choices=["pad", "crop"], help="pad to square (authors) or centre-crop")
    p.add_argument("--allow-large-images", action="store_true", help="lift the 100-megapixel guard")


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    _add_model_loading_arguments(p)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, help="nucleus sampling threshold (with --temperature > 0)")
    p.add_argument("--seed", type=int, help="seed for sampling")


def add_bench_encoder_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resolutions", type=int, nargs="+", help="input sides in px (default 256 512 1024)")
    p.add_argument("--device", nargs="+", choices=["cpu", "cuda"], help="default: cpu, and cuda when present")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, help="timed calls per form (default 5; 3 with --quick)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--fused-dtype",
        choices=["auto", "fp32", "bf16", "fp16"],
        default="auto",
        help="dtype of the fused form (auto: fp32 on CPU, bf16 on GPU; bf16 is also fast on CPUs with AVX512-BF16)",
    )
    p.add_argument("--quick", action="store_true", help="256 and 512 px, 3 repeats")
    p.add_argument("--json", help="also write the rows and machine description to this JSON file")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (CLIError, OSError, ValueError) as err:
        print(f"fastvlm {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``parity convert SRC DST``: write a parity dump from an SGLang dumper or msProbe dump.

``SRC`` is detected (``--from`` names the format instead); ``DST`` must not hold a dump (the
writer refuses one, as a capture does). Tensors are loaded one at a time, with
``torch.load(weights_only=True)`` / ``numpy.load(allow_pickle=False)`` only, and written in
shards as a capture writes them, so memory stays bounded by one tensor plus one shard. The
result is checked by reading it back (:func:`~parity.store.reader.load_run`). Prints one line:
what was written. Exit 0, or 2 when ``SRC`` cannot be read (one line on stderr).
"""

from __future__ import annotations

import click

from parity.commands import CONTEXT


@click.command("convert", context_settings=CONTEXT)
@click.argument("src", type=click.Path(file_okay=False))
@click.argument("dst", type=click.Path(file_okay=False))
@click.option("--from", "fmt", type=click.Choice(["sglang", "msprobe"]), default=None,
              help="Format of SRC (default: detected).")
@click.option("--salvage", is_flag=True,
              help="Skip tensor files that cannot be read (noted in the dump) instead of stopping.")
def convert_cmd(src: str, dst: str, fmt: str | None, salvage: bool) -> int:
    """Write the SGLang dumper or msProbe dump SRC as a parity dump DST.

    Other commands read SRC directly (in memory); a converted dump opens faster, can be
    compared with --workers, and is checksummed. Nothing in SRC is unpickled beyond
    torch.load(weights_only=True) and numpy.load(allow_pickle=False).
    """
    from pathlib import Path

    from parity.errors import DumpError
    from parity.store.importers import convert
    from parity.store.reader import load_run

    if Path(dst).exists() and any(Path(dst).glob("manifest-rank*.jsonl")):
        raise DumpError(f"{dst} holds a dump already", hint="choose an empty output directory")
    found, written = convert(src, dst, fmt=fmt, salvage=salvage)
    run = load_run(dst)
    click.echo(f"converted {found} dump {src} -> {dst}: {written} records, {len(run.headers)} rank(s), "
               f"mode {run.mode}")
    return 0

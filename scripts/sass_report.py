# SPDX-License-Identifier: Apache-2.0
"""Static figures of the attention and codec kernels from their sm_90 machine code (no GPU).

    python3 scripts/sass_report.py --cubin attention.cubin --nvdisasm BIN --cuobjdump BIN \
        --source kernels/attention/attention.cuh [--markdown]
    python3 scripts/sass_report.py --codec --cubin codec.cubin --nvdisasm BIN --cuobjdump BIN \
        [--markdown]
    python3 scripts/sass_report.py --store --cubin store.cubin --nvdisasm BIN --cuobjdump BIN \
        [--markdown]

Store kernels (--store, the cubin of src/cuda/store.cu): as the codec's, loops named by the
store's source lines (kernels/store/).

Codec kernels (--codec): per instantiation the registers, stack, local and static shared
memory, the whole kernel's SASS, the instructions that mark slow patterns anywhere in it (byte
loads LDG.U8, shared and global atomics, runtime integer division: I2F.U32.RP starts one,
64-bit division calls, FP64 and MUFU), and every innermost loop: a backward branch whose body
holds no other loop. A loop's body is straight-line or has only forward branches, so its static
count is what one iteration executes at most (every predicated or skipped instruction
counted): for loops that handle one element per thread and iteration, the SASS per element of
that loop. Loops are named by the kernel source lines their instructions come from (innermost
inlined location). Bank conflicts cannot be read from the SASS (they depend on addresses at run
time): the report lists the shared loads and stores of each loop; docs/performance.md reasons
about their addresses.

Per kernel instantiation: registers, stack and local memory (cuobjdump -res-usage), HMMA and
LDSM counts, and the SASS of the main loop: the outermost loop that contains HMMA, whose body
must hold no nested loop. "loop SASS" counts its whole body, every branch included; "steady"
the iteration of a unit in the middle of a long sequence: the path through the body that issues
every cp.async (LDGSTS) it can, so that the next unit is staged, and otherwise the fewest
instructions, so that the blocks only some units take (a unit that ends the sequence, masked
tokens, a running max that grew, divergent fallbacks of the warp collectives) are skipped.
Predicated-off instructions count as executed. Per element divides the steady path by the K and
V elements one iteration of a warp consumes, times 32 lanes.

The split between K and V is by source line (nvdisasm -gi): the kernel source (attention.cuh,
and tile_attention.cuh beside it for the tile kernel) marks its regions with comment lines
`// [sass stage]`, `// [sass K]`, `// [sass softmax]`, `// [sass V]`, each running to the next
marker. The tile kernel's feeding blocks are also named by the tile width whose
tile_products_any call their HMMA were inlined from. Instructions of inlined helpers take the region of the kernel line
before them, and the compiler interleaves regions, so the split is approximate; the total is
exact. Staging and softmax/bookkeeping are shared half and half between K and V.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field

# Elements of K (and as many of V) that one main-loop iteration of a warp consumes, by kernel.
# The dense kernel stages 4096 / D tokens x D channels: 4096 of each.
# The tile kernel consumes one block of T tokens x D channels per iteration (its tail unit, once
# per sequence, takes another branch of the same loop: counted as if executed, an upper bound).
ELEMENTS_PER_ITERATION = {"attention_dense_kernel": lambda dt, d, t: 4096,
                          "attention_tiles_kernel": lambda dt, d, t: d * t}

INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)(\.[A-Z0-9_.]+)?\s*(.*?);")
LINE = re.compile(r'//## File "([^"]+)", line (\d+)(?: inlined at "([^"]+)", line (\d+))?')
LABEL = re.compile(r"^\s*(\.L_x_\d+):")
BRANCH = re.compile(r"BRA\s+(?:\S+,\s*)?`\((\.L_x_\d+)\)")
MARKER = re.compile(r"//\s*\[sass (\w+)\]")


@dataclass
class Insn:
    addr: int
    op: str
    text: str
    src_line: tuple[str, int] | None  # (file name, line) of the kernel's own source line
    frames: tuple[tuple[str, int], ...] = ()  # the whole inline chain, innermost first


@dataclass
class Kernel:
    name: str
    insns: list[Insn] = field(default_factory=list)
    labels: dict[str, int] = field(default_factory=dict)  # label -> index of next insn


def demangle(name: str) -> str:
    try:
        return subprocess.run(["c++filt", name], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return name


def parse_disassembly(text: str, sources: list[str]) -> dict[str, Kernel]:
    """Instructions per kernel, each with the line of one of `sources` (file names) it comes
    from (the outermost frame in them: the kernel's own line) and its inline chain."""
    kernels: dict[str, Kernel] = {}
    cur: Kernel | None = None
    line, chain, fresh = None, [], True
    for raw in text.splitlines():
        if raw.startswith(".text."):
            name = raw[len(".text."):].rstrip(":")
            cur = kernels.setdefault(name, Kernel(name))
            line, chain, fresh = None, [], True
            continue
        if cur is None:
            continue
        m = LINE.search(raw)
        if m:  # the kernel source's own line, or the line a helper was inlined at
            if fresh:
                chain, fresh = [], False
            chain.append((m.group(1).split("/")[-1], int(m.group(2))))
            for f, n in ((m.group(3), m.group(4)), (m.group(1), m.group(2))):
                if f and f.split("/")[-1] in sources:
                    line = (f.split("/")[-1], int(n))
                    break
            continue
        m = LABEL.match(raw)
        if m:
            cur.labels[m.group(1)] = len(cur.insns)
            continue
        m = INSN.search(raw)
        if m:
            fresh = True
            cur.insns.append(Insn(int(m.group(1), 16), m.group(3), raw.strip(), line,
                                  tuple(chain)))
    return kernels


# A tile width's call in tile_products_any (tile_attention.cuh): `tile_products<DT, 4>` is 4
# bits (16: raw), `plane_products<DT, 2, 1>` the two-plane 3 bits.
WIDTH_CALL = re.compile(r"\b(?:tile|plane)_products<DT,\s*(\d+)(?:,\s*(\d+))?>\s*\(")


def width_calls(path: str) -> dict[tuple[str, int], str]:
    """(file name, line) -> tile width label of the calls in tile_products_any."""
    out = {}
    try:
        with open(path, encoding="utf-8") as f:
            for n, text in enumerate(f, 1):
                m = WIDTH_CALL.search(text)
                if m:
                    bits = int(m.group(1)) + int(m.group(2) or 0)
                    out[(path.split("/")[-1], n)] = "raw" if bits == 16 else f"{bits}-bit"
    except OSError:
        pass
    return out


def main_loop(k: Kernel) -> tuple[int, int, bool] | None:
    """(first, last) instruction indices of the outermost HMMA loop, and whether it nests."""
    loops = []
    for i, ins in enumerate(k.insns):
        m = BRANCH.search(ins.text)
        if m and m.group(1) in k.labels and k.labels[m.group(1)] <= i:
            loops.append((k.labels[m.group(1)], i))
    with_mma = [(a, b) for a, b in loops if any(x.op == "HMMA" for x in k.insns[a:b + 1])]
    if not with_mma:
        return None
    a, b = max(with_mma, key=lambda r: r[1] - r[0])
    nested = any(a <= x < y < b or a < x < y <= b for x, y in loops if (x, y) != (a, b))
    return a, b, nested


def steady_path(k: Kernel, a: int, b: int) -> list[Insn]:
    """The instructions of the loop body [a, b] on the path from its head to its backward
    branch that holds the most LDGSTS and, among those, the fewest instructions (forward
    branches and fall-throughs only: the body holds no nested loop)."""
    best: list[tuple[int, int, tuple] | None] = [None] * (b - a + 2)
    best[0] = (0, 0, ())  # (-LDGSTS, instructions, path) on reaching index a + i
    for i in range(a, b + 1):
        cur = best[i - a]
        if cur is None:
            continue
        ins = k.insns[i]
        real = ins.op != "NOP"
        here = (cur[0] - (ins.op == "LDGSTS"), cur[1] + real, cur[2] + ((ins,) if real else ()))
        if i == b:
            return list(here[2])
        m = BRANCH.search(ins.text)
        targets = []
        if m and m.group(1) in k.labels and i < k.labels[m.group(1)] <= b:
            targets.append(k.labels[m.group(1)])
        unconditional = ins.op in ("BRA", "EXIT", "RET", "JMP") and not \
            re.search(r"@!?U?P\w+\s+" + ins.op, ins.text)
        if not unconditional:
            targets.append(i + 1)
        for t in targets:
            old = best[t - a]
            if old is None or here[:2] < old[:2]:
                best[t - a] = here
    return []


def basic_blocks(k: Kernel) -> list[list[Insn]]:
    """Straight-line runs: split at labels and after branches."""
    starts = set(k.labels.values())
    blocks, cur = [], []
    for i, ins in enumerate(k.insns):
        if i in starts and cur:
            blocks.append(cur)
            cur = []
        cur.append(ins)
        if ins.op in ("BRA", "EXIT", "RET", "BRX", "JMP"):
            blocks.append(cur)
            cur = []
    if cur:
        blocks.append(cur)
    return blocks


def feeding_blocks(k: Kernel, region_of: dict[tuple[str, int], str],
                   widths: dict[tuple[str, int], str]) -> list[dict]:
    """The straight-line blocks that feed the tensor cores, each with its SASS per element: one
    m16n8k16 consumes a 16 x 8 B operand, 128 K or V elements, so a block of N instructions and
    H HMMA costs 32 N / (128 H) instructions per element (loads, conversion and MMA; not the
    per-block work outside it). A tile kernel's block is named by its region and the tile width
    its HMMA come from (the tile_products_any call in their inline chain)."""
    out = []
    for b in basic_blocks(k):
        body = [x for x in b if x.op != "NOP"]
        hmma = sum(x.op == "HMMA" for x in body)
        if not hmma:
            continue
        names = []
        for x in body:
            if x.op == "HMMA":
                name = region_of.get(x.src_line) or "other"
                width = next((widths[f] for f in x.frames if f in widths), None)
                names.append(f"{name} {width}" if width else name)
        conv = sum(x.op in ("LOP3", "PRMT", "HADD2", "HFMA2", "HMUL2", "SHF", "F2FP", "I2F", "I2FP")
                   for x in body)
        out.append(dict(region=max(set(names), key=names.count), sass=len(body), hmma=hmma,
                        conversions=conv, per_elem=32 * len(body) / (128 * hmma)))
    return out


def regions(source_path: str) -> dict[tuple[str, int], str]:
    """(file name, source line) -> region name, from the [sass ...] markers."""
    out, cur, name = {}, None, source_path.split("/")[-1]
    with open(source_path, encoding="utf-8") as f:
        for n, text in enumerate(f, 1):
            m = MARKER.search(text)
            if m:
                cur = m.group(1)
            out[(name, n)] = cur
    return out


def res_usage(cuobjdump: str, cubin: str) -> dict[str, dict[str, int]]:
    out = subprocess.run([cuobjdump, "-res-usage", cubin], capture_output=True, text=True,
                         check=True).stdout
    usage, name = {}, None
    for raw in out.splitlines():
        m = re.match(r"\s*Function (\S+):", raw)
        if m:
            name = m.group(1)
            continue
        if name and "REG:" in raw:
            usage[name] = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", raw)}
            name = None
    return usage


LINE_ANY = re.compile(r'//## File "([^"]+)", line (\d+)')

# Instruction classes that mark slow patterns in the codec kernels.
CODEC_MARKERS = {
    "LDG.U8": lambda op, mods: op in ("LDG", "LD") and ".U8" in mods,
    "ATOMS": lambda op, mods: op == "ATOMS",
    "ATOMG/RED": lambda op, mods: op in ("ATOMG", "ATOM", "RED", "REDG"),
    "div (I2F.RP)": lambda op, mods: op == "I2F" and ".RP" in mods,
    "CALL": lambda op, mods: op == "CALL",
    "FP64": lambda op, mods: op in ("DADD", "DMUL", "DFMA", "DSETP") or (op == "F2F" and
                                                                       "F64" in mods),
    "MUFU": lambda op, mods: op == "MUFU",
    "BAR": lambda op, mods: op == "BAR",
    "SHFL": lambda op, mods: op == "SHFL",
}


def parse_codec(text: str, frames: str = "/codec/") -> dict[str, list[dict]]:
    """Kernel name -> instructions with op, modifiers, text and innermost source (file:line):
    the innermost frame in a `frames` folder, else the innermost."""
    kernels, cur, where, chain = {}, None, None, []
    for raw in text.splitlines():
        if raw.startswith(".text."):
            name = raw[len(".text."):].rstrip(":")
            cur = kernels.setdefault(name, {"insns": [], "labels": {}})
            where, chain = None, []
            continue
        if cur is None:
            continue
        m = LINE_ANY.search(raw)
        if m:  # a chain of frames, innermost first: name the line by the innermost codec frame
            chain.append((m.group(1), m.group(2)))
            continue
        if chain:
            f, n = next((c for c in chain if frames in c[0]), chain[0])
            where, chain = f"{f.split('/')[-1]}:{n}", []
        m = LABEL.match(raw)
        if m:
            cur["labels"][m.group(1)] = len(cur["insns"])
            continue
        m = INSN.search(raw)
        if m:
            cur["insns"].append(dict(op=m.group(3), mods=m.group(4) or "", text=raw.strip(),
                                     where=where))
    return kernels


def innermost_loops(k: dict) -> list[tuple[int, int]]:
    insns, labels = k["insns"], k["labels"]
    loops = []
    for i, ins in enumerate(insns):
        m = BRANCH.search(ins["text"])
        if m and m.group(1) in labels and labels[m.group(1)] <= i:
            loops.append((labels[m.group(1)], i))
    return [(a, b) for a, b in loops
            if not any((x, y) != (a, b) and a <= x and y <= b for x, y in loops)]


def shortest_path(k: dict, a: int, b: int) -> int:
    """Fewest instructions from the loop head (a) to its backward branch (b), following
    fall-throughs and forward branches inside [a, b]: one iteration that skips every
    conditional block (escapes, refills, slow paths), a lower bound of what it executes."""
    insns, labels = k["insns"], k["labels"]
    inf = float("inf")
    dist = [inf] * (b - a + 2)  # dist[i - a]: instructions executed before reaching i
    dist[0] = 0
    for i in range(a, b + 1):
        d = dist[i - a]
        if d == inf:
            continue
        ins = insns[i]
        cost = 0 if ins["op"] == "NOP" else 1
        m = BRANCH.search(ins["text"])
        unconditional = ins["op"] in ("BRA", "EXIT", "RET", "JMP") and not \
            re.search(r"@!?U?P\w+\s+" + ins["op"], ins["text"])
        if m and m.group(1) in labels and a < labels[m.group(1)] <= b and labels[m.group(1)] > i:
            t = labels[m.group(1)]
            dist[t - a] = min(dist[t - a], d + cost)
        if i == b:
            return int(d + cost)
        if not unconditional:
            dist[i + 1 - a] = min(dist[i + 1 - a], d + cost)
    return -1


def codec_report(cubin, nvdisasm, cuobjdump, markdown, store=False):
    dis = subprocess.run([nvdisasm, "-gi", "-c", cubin], capture_output=True, text=True,
                         check=True).stdout
    kernels = parse_codec(dis, "/store/" if store else "/codec/")
    usage = res_usage(cuobjdump, cubin)
    dtypes = {1: "fp16", 2: "bf16", 3: "fp32"}
    rows = []
    for mangled, k in sorted(kernels.items()):
        if store:  # the store's kernels: no dtype parameter
            m = re.search(r"kvc::kernels::store::(\w+_kernel)\(", demangle(mangled))
        else:
            m = re.search(r"kvc::kernels::(\w+_kernel)<\(kvc_dtype\)(\d)>", demangle(mangled))
        if not m:
            continue
        insns = [x for x in k["insns"] if x["op"] != "NOP"]
        u = usage.get(mangled, {})
        row = dict(kernel=m.group(1),
                   dtype="-" if store else dtypes.get(int(m.group(2)), m.group(2)),
                   regs=u.get("REG"), stack=u.get("STACK"), local=u.get("LOCAL"),
                   shared=u.get("SHARED"), sass=len(insns),
                   markers={n: sum(f(x["op"], x["mods"]) for x in insns)
                            for n, f in CODEC_MARKERS.items()}, loops=[])
        for a, b in innermost_loops(k):
            body = [x for x in k["insns"][a:b + 1] if x["op"] != "NOP"]
            lines = sorted({x["where"] for x in body if x["where"]},
                           key=lambda w: (w.split(":")[0], int(w.split(":")[1])))
            files = {}
            for w in lines:
                f, n = w.split(":")
                files.setdefault(f, []).append(int(n))
            src = "; ".join(f"{f} {min(v)}-{max(v)}" if min(v) != max(v) else f"{f} {v[0]}"
                            for f, v in files.items())
            row["loops"].append(dict(
                sass=len(body), src=src, shortest=shortest_path(k, a, b),
                ops={n: c for n, c in ((n, sum(f(x["op"], x["mods"]) for x in body))
                                       for n, f in CODEC_MARKERS.items()) if c},
                lds=sum(x["op"] == "LDS" for x in body), sts=sum(x["op"] == "STS" for x in body),
                ldg=sum(x["op"] in ("LDG", "LD") for x in body),
                stg=sum(x["op"] in ("STG", "ST") for x in body)))
        rows.append(row)
    head = ["kernel", "dtype", "regs", "stack", "local", "static smem", "SASS"] + \
        list(CODEC_MARKERS)
    fmt = (lambda cells: "| " + " | ".join(cells) + " |") if markdown else \
        (lambda cells: "  ".join(f"{c:>7}" if i else f"{c:<17}" for i, c in enumerate(cells)))
    print(fmt(head))
    if markdown:
        print("|" + "---|" * len(head))
    for r in rows:
        print(fmt([r["kernel"], r["dtype"], str(r["regs"]), str(r["stack"]), str(r["local"]),
                   str(r["shared"]), str(r["sass"])] + [str(r["markers"][n]) for n in CODEC_MARKERS]))
    print("\nInnermost loops (SASS of the body, i.e. of one iteration at most, and of its shortest "
          "path through the body; shared loads and stores, global or generic loads and stores in "
          "it; source lines):")
    for r in rows:
        print(f"  {r['kernel']} {r['dtype']}:")
        for lp in sorted(r["loops"], key=lambda lp: lp["src"]):
            extra = " ".join(f"{n}={c}" for n, c in lp["ops"].items())
            print(f"    {lp['sass']:4d} SASS (shortest path {lp['shortest']:3d})  LDS {lp['lds']} "
                  f"STS {lp['sts']} LD {lp['ldg']} "
                  f"ST {lp['stg']} {extra}  [{lp['src']}]")
    return rows


def report(cubin, nvdisasm, cuobjdump, source, markdown):
    dis = subprocess.run([nvdisasm, "-gi", "-c", cubin], capture_output=True, text=True,
                         check=True).stdout
    # The tile kernel's source (with its own markers) lies beside the dense kernel's.
    tile_source = os.path.join(os.path.dirname(source), "tile_attention.cuh")
    sources = [source] + ([tile_source] if os.path.exists(tile_source) else [])
    kernels = parse_disassembly(dis, [s.split("/")[-1] for s in sources])
    usage = res_usage(cuobjdump, cubin)
    region_of = {}
    for s in sources:
        region_of.update(regions(s))
    widths = width_calls(tile_source)
    rows = []
    for mangled, k in sorted(kernels.items()):
        pretty = demangle(mangled)
        m = re.search(r"kvc::kernels::(\w+)<\(kvc_dtype\)(\d), (\d+)u(?:, (\d+)u)?", pretty)
        if not m or "attention" not in m.group(1):
            continue
        kind, dt, d = m.group(1), int(m.group(2)), int(m.group(3))
        extra = int(m.group(4)) if m.group(4) else None
        if extra is not None:  # the compressed kernel's group bucket, the tile kernel's T
            kind += f"<T{extra}>" if "tiles" in kind else f"<G{extra}>"
        if re.search(r", true>\(", pretty):  # the MMA kernels' variant for groups above 8
            kind = (kind[:-1] + ",G9+>") if kind.endswith(">") else kind + "<G9+>"
        u = usage.get(mangled, {})
        row = dict(kernel=kind, dtype={1: "fp16", 2: "bf16"}.get(dt, str(dt)), head_dim=d,
                   regs=u.get("REG"), stack=u.get("STACK"), local=u.get("LOCAL"),
                   hmma=sum(x.op == "HMMA" for x in k.insns),
                   ldsm=sum(x.op == "LDSM" for x in k.insns))
        loop = main_loop(k)
        per_iter = ELEMENTS_PER_ITERATION.get(m.group(1))
        if loop and per_iter and not loop[2]:
            a, b, _ = loop
            body = [x for x in k.insns[a:b + 1] if x.op != "NOP"]
            steady = steady_path(k, a, b)
            count = {}
            for x in steady:
                r = region_of.get(x.src_line) or "other"
                count[r] = count.get(r, 0) + 1
            elems = per_iter(dt, d, extra)
            shared = count.get("stage", 0) + count.get("softmax", 0) + count.get("other", 0)
            row.update(loop_sass=len(body), steady_sass=len(steady), elems=elems,
                       per_elem=32 * len(steady) / (2 * elems),
                       per_k=32 * (count.get("K", 0) + shared / 2) / elems,
                       per_v=32 * (count.get("V", 0) + shared / 2) / elems,
                       regions=count)
        else:
            row.update(loop_sass=None, note="no straight-line HMMA loop" if per_iter
                       else "data-dependent inner loops: no static per-element count")
        row["feeding"] = feeding_blocks(k, region_of, widths)
        rows.append(row)
    print_rows(rows, markdown)
    return rows


def print_rows(rows, markdown):
    head = ["kernel", "dtype", "D", "regs", "stack", "local", "HMMA", "LDSM", "loop SASS",
            "steady", "per elem", "per K elem*", "per V elem*"]
    fmt = (lambda cells: "| " + " | ".join(cells) + " |") if markdown else \
        (lambda cells: "  ".join(f"{c:>9}" if i else f"{c:<33}" for i, c in enumerate(cells)))
    print(fmt(head))
    if markdown:
        print("|" + "---|" * len(head))
    for r in rows:
        def num(v, f="{:.2f}"):
            return "-" if v is None else f.format(v)
        print(fmt([r["kernel"], r["dtype"], str(r["head_dim"]), str(r["regs"]), str(r["stack"]),
                   str(r["local"]), str(r["hmma"]), str(r["ldsm"]),
                   num(r.get("loop_sass"), "{}"), num(r.get("steady_sass"), "{}"),
                   num(r.get("per_elem")), num(r.get("per_k")),
                   num(r.get("per_v"))]))
    print("\n* K/V split by source region, approximate (staging and softmax shared half and "
          "half); per elem = steady-path SASS x 32 lanes / (K + V elements per iteration).")
    for r in rows:
        if r.get("regions"):
            print(f"  {r['kernel']} {r['dtype']} D={r['head_dim']}: steady-path regions "
                  f"{r['regions']}")
        elif r.get("note"):
            print(f"  {r['kernel']} {r['dtype']} D={r['head_dim']}: {r['note']}")
    print("\nStraight-line blocks that feed the tensor cores (region, SASS, HMMA, conversion ops, "
          "SASS per element = 32 SASS / (128 HMMA)):")
    for r in rows:
        feeding = [f for f in r.get("feeding", []) if f["hmma"] >= 2]
        if feeding:
            cells = ", ".join(f"{f['region']}: {f['sass']}/{f['hmma']}/{f['conversions']} = "
                              f"{f['per_elem']:.2f}" for f in feeding)
            print(f"  {r['kernel']} {r['dtype']} D={r['head_dim']}: {cells}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cubin", required=True)
    ap.add_argument("--nvdisasm", required=True)
    ap.add_argument("--cuobjdump", required=True)
    ap.add_argument("--source", help="the attention kernel source with [sass ...] markers")
    ap.add_argument("--codec", action="store_true", help="report the codec kernels instead")
    ap.add_argument("--store", action="store_true",
                    help="report the store kernels (src/cuda/store.cu) as the codec's")
    ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args(argv)
    if a.codec or a.store:
        codec_report(a.cubin, a.nvdisasm, a.cuobjdump, a.markdown, store=a.store)
    elif a.source:
        report(a.cubin, a.nvdisasm, a.cuobjdump, a.source, a.markdown)
    else:
        ap.error("--source is required without --codec or --store")


if __name__ == "__main__":
    sys.exit(main())

"""HuBMAP ASCT+B tables -> one marker table for ``dask-annot build-reference --markers``.

    python scripts/asctb_markers.py --shared ../shared --output human.csv [--species mouse]

Reads every ``*/asct-b/*.csv`` under ``SHARED/data/markers/hubmap_asctb`` (CC BY 4.0,
HuBMAP Human Reference Atlas; the newest release of each organ is what the directory
holds, see its README) and writes one row per (cell type, gene, organ)::

    cell_type,ontology_id,gene,sign,organ

Rules (the whole of the curation; nothing is hand-edited per cell type):
- the cell type of a row is its last ``CT/n`` whose id is a Cell Ontology id known to the
  Cell Ontology release shipped in the package (rows ending in a temporary id are dropped),
  except that a chain term which is a CL ancestor of the term before it qualifies that term
  (see :func:`row_type`);
- positive markers: the row's ``BGene/n`` genes. Tables often write a gene by its product's
  name ("Glucagon", "Chromogranin A", "CD20"); each entry's HGNC id is resolved to the symbol
  the tables themselves give for that id (the most frequent symbol-like ``LABEL``, else the
  most frequent symbol-like name), falling back to the name when it looks like a symbol;
- negative markers: the row's ``BProtein/n`` entries written ``NAME-`` (not ``+/-`` or ``lo``)
  whose HGNC id is a gene symbol some ``BGene`` column of any table names (so the protein
  names resolve to symbols without another source); a gene positive for a type anywhere is
  never negative for it.

``--species mouse``: symbols are mapped by case (``CD19`` -> ``Cd19``, first letter upper,
the rest lower), which is the one-to-one ortholog's symbol for most genes; a handful of
genes whose mouse orthologs have other names are listed in :data:`MOUSE_RENAMES` (each from
MGI's ortholog table as commonly known; a human gene with no mouse counterpart, such as the
HLA class II genes' human names, maps to the mouse H2 genes only where listed). With
``--mouse-genes FILE`` (one symbol per line, e.g. the union of mouse datasets' genes) the
script reports how many marker genes exist in mouse under the mapped name, and drops the
others.
"""
from __future__ import annotations

import argparse
import csv
import gzip
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CL_PATTERN = re.compile(r"^CL:\d{7}$")
SYMBOL = re.compile(r"^[A-Z0-9][A-Z0-9\-\.]*$")

# human symbol -> mouse symbols where case mapping is wrong (orthologs with other names)
MOUSE_RENAMES: dict[str, tuple[str, ...]] = {
    "INS": ("Ins1", "Ins2"),
    "HLA-DRA": ("H2-Ea",),
    "HLA-DRB1": ("H2-Eb1",),
    "HLA-DQA1": ("H2-Aa",),
    "HLA-DQB1": ("H2-Ab1",),
    "HLA-DPA1": ("H2-Aa",),
    "HLA-DPB1": ("H2-Ab1",),
    "CD1C": ("Cd1d1",),
    "FCGR3A": ("Fcgr4",),
    "FCGR3B": ("Fcgr4",),
    "MS4A1": ("Ms4a1",),
    "PTPRC": ("Ptprc",),
    "KLRD1": ("Klrd1",),
    "NCAM1": ("Ncam1",),
    "CSF3R": ("Csf3r",),
    # LYZ -> Lyz1/Lyz2 is the ortholog pair but is left out (so LYZ is lost, as it was): mouse Lyz2 is as high
    # in neutrophils as in monocytes and Lyz1 is the Paneth cell gene, so the human monocyte marker misleads
    # (measured: Zilionis neutrophils 0.955 -> 0.575, ACTINN monocytes 0.49 -> 0.20 with it)
    # one-to-one (or one-to-few) orthologs whose mouse symbol is not the human one up to case; older and
    # newer MGI symbols both listed where MGI renamed the gene (the vocabulary keeps the one a data set uses)
    "CA2": ("Car2", "Ca2"),
    "CA4": ("Car4", "Ca4"),
    "CA7": ("Car7", "Ca7"),
    "CD8B": ("Cd8b1",),
    "FCGR1A": ("Fcgr1",),
    "FCER2": ("Fcer2a",),
    "TCL1A": ("Tcl1",),
    "CD24": ("Cd24a",),
    "IL4R": ("Il4ra",),
    "CD1D": ("Cd1d1", "Cd1d2"),
    "CCL21": ("Ccl21a",),
    "HBB": ("Hbb-bs", "Hbb-bt"),
    "HBA1": ("Hba-a1", "Hba-a2"),
    "HBA2": ("Hba-a1", "Hba-a2"),
    "REN": ("Ren1",),
    "SELENOP": ("Selenop", "Sepp1"),
    "CCN1": ("Ccn1", "Cyr61"),
    "CCN4": ("Ccn4", "Wisp1"),
    "CAVIN2": ("Cavin2", "Sdpr"),
    "TENT5A": ("Tent5a", "Fam46a"),
}

# gene names some tables write with no HGNC id and no symbol (a protein name, an old symbol, a typo)
# -> the HGNC symbol; ambiguous ones ("CD3", "S100", "P60") are left as they are (and match nothing)
NAME_TO_SYMBOL: dict[str, str] = {
    "NKP46": "NCR1",
    "SYNAPTOPHYSIN": "SYP",
    "LANGERIN": "CD207",
    "SMOOTHELIN": "SMTN",
    "MELANA": "MLANA",
    "PLUNC": "BPIFA1",
    "HAL-DQB1": "HLA-DQB1",
}


def organ_name(path: Path) -> str:
    stem = path.stem.lower().replace("asct-b-vh-", "").replace("asct-b_vh_", "").replace("asct-b-", "")
    return stem.replace("_", "-")


def read_table(path: Path) -> tuple[list[str], list[list[str]]]:
    rows = list(csv.reader(open(path, encoding="utf-8-sig", newline="")))
    for i, r in enumerate(rows):
        if r and r[0].strip() == "AS/1":
            return r, rows[i + 1:]
    return [], []


def row_type(ids: list[str], cl: dict) -> str:
    """The cell type a row's markers describe: its chain's last CL term, except that a term
    which is a Cell Ontology ancestor of the term before it is a qualifier, not a subtype
    (pancreas: "pancreatic ductal cell > epithelial cell of exocrine pancreas: KRT19" describes
    ductal cells, not every exocrine epithelial cell). ``ids[-1]`` is a known CL id."""
    cur = ids[-1]
    valid = [t for t in ids if t in cl and not cl[t]["label"].startswith("obsolete")]
    if valid:
        cur = valid[0]
        for t in valid[1:]:
            if t != cur and t not in cl[cur]["ancestors"]:
                cur = t
    return cur


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"))
    ap.add_argument("--output", required=True)
    ap.add_argument("--species", default="human", choices=["human", "mouse"])
    ap.add_argument("--mouse-genes", default=None, help="file of mouse symbols to check mapped genes against")
    a = ap.parse_args(argv)
    src = Path(a.shared) / "data" / "markers" / "hubmap_asctb"
    files = sorted(p for p in src.glob("*/asct-b/*.csv") if "crosswalk" not in p.name)
    if not files:
        print(f"{src}: no ASCT+B tables found; pass --shared pointing at the shared data", file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT))
    from dask_annot.ontology import cell_ontology

    cl = cell_ontology()
    tables = [(organ_name(p), *read_table(p)) for p in files]
    # HGNC id -> symbol, from what the tables write for that id (gene and protein columns)
    from collections import Counter

    by_label: dict[str, Counter] = defaultdict(Counter)
    by_name: dict[str, Counter] = defaultdict(Counter)
    for _, hdr, rows in tables:
        col = {c: i for i, c in enumerate(hdr)}
        for c in hdr:
            if re.match(r"^B(Gene|Protein)/\d+$", c) and f"{c}/ID" in col:
                for r in rows:
                    r = r + [""] * (len(hdr) - len(r))
                    gid = r[col[f"{c}/ID"]].strip()
                    if not gid.startswith("HGNC:"):
                        continue
                    lab = r[col[f"{c}/LABEL"]].strip() if f"{c}/LABEL" in col else ""
                    name = r[col[c]].strip().rstrip("+-/").strip()
                    if SYMBOL.match(lab):
                        by_label[gid][lab] += 1
                    if SYMBOL.match(name):
                        by_name[gid][name] += 1
    hgnc: dict[str, str] = {}
    for gid in set(by_label) | set(by_name):
        pick = by_label.get(gid) or by_name.get(gid)
        hgnc[gid] = sorted(pick.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
    pos: dict[tuple[str, str], set[str]] = defaultdict(set)  # (CL id, gene) -> organs
    neg: dict[tuple[str, str], set[str]] = defaultdict(set)
    dropped_ct = set()
    for organ, hdr, rows in tables:
        col = {c: i for i, c in enumerate(hdr)}
        ct_ids = [c for c in hdr if re.match(r"^CT/\d+/ID$", c)]
        genes = [c for c in hdr if re.match(r"^BGene/\d+$", c)]
        prots = [c for c in hdr if re.match(r"^BProtein/\d+$", c)]
        for r in rows:
            if len(r) < len(hdr):
                r = r + [""] * (len(hdr) - len(r))
            ids = [r[col[c]].strip() for c in ct_ids if r[col[c]].strip()]
            if not ids:
                continue
            if not CL_PATTERN.match(ids[-1]) or ids[-1] not in cl or cl[ids[-1]]["label"].startswith("obsolete"):
                dropped_ct.add(ids[-1])
                continue
            term = row_type(ids, cl)
            for c in genes:
                gid = r[col[f"{c}/ID"]].strip() if f"{c}/ID" in col else ""
                sym = hgnc.get(gid) or r[col[c]].strip().upper()
                sym = NAME_TO_SYMBOL.get(sym.upper(), sym)
                if sym and SYMBOL.match(sym):
                    pos[(term, sym.upper())].add(organ)
            for c in prots:
                name, gid = r[col[c]].strip(), r[col.get(f"{c}/ID", col[c])].strip()
                if name.endswith("-") and not name.endswith("+/-") and gid in hgnc:
                    neg[(term, hgnc[gid])].add(organ)
    rows_out = []
    for (term, g), organs in pos.items():
        rows_out.append((cl[term]["label"], term, g, "+", ";".join(sorted(organs))))
    has_pos = {term for term, _ in pos}
    for (term, g), organs in neg.items():
        if (term, g) not in pos and term in has_pos:  # a type needs positive markers to be called
            rows_out.append((cl[term]["label"], term, g, "-", ";".join(sorted(organs))))
    report = {"tables": len(files), "cell_types": len({r[1] for r in rows_out}), "rows": len(rows_out),
              "genes": len({r[2] for r in rows_out}), "negative_rows": sum(r[3] == "-" for r in rows_out),
              "cell_types_dropped_not_in_cl": len(dropped_ct),
              "organs": len({o for r in rows_out for o in r[4].split(";")})}
    if a.species == "mouse":
        known = None
        if a.mouse_genes:
            known = {x.strip() for x in open(a.mouse_genes) if x.strip()}
        mapped, lost = [], set()
        for name, term, g, sign, organs in rows_out:
            cands = MOUSE_RENAMES.get(g) or (g[:1] + g[1:].lower(),)
            ok = [m for m in cands if known is None or m in known]
            if not ok:
                lost.add(g)
            for m in ok:
                mapped.append((name, term, m, sign, organs))
        human_genes = {r[2] for r in rows_out}
        report.update(human_genes=len(human_genes), mouse_genes_kept=len(human_genes - lost), genes_lost=len(lost),
                      lost_examples=sorted(lost)[:40], checked_against=a.mouse_genes)
        merged: dict[tuple, set[str]] = {}  # two human genes with one mouse ortholog (HBA1, HBA2 -> Hba-a1): one row
        for name, term, m, sign, organs in mapped:
            merged.setdefault((name, term, m, sign), set()).update(organs.split(";"))
        mapped = [(*k, ";".join(sorted(v))) for k, v in merged.items()]
        pos_types = {r[1] for r in mapped if r[3] == "+"}
        rows_out = [r for r in mapped if r[1] in pos_types]  # a type needs a positive marker left
        report["rows"] = len(rows_out)
        report["cell_types"] = len({r[1] for r in rows_out})
    rows_out.sort(key=lambda r: (r[1], r[3] != "+", r[2]))
    out = Path(a.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["cell_type", "ontology_id", "gene", "sign", "organ"])
        w.writerows(rows_out)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

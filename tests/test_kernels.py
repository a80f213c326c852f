"""The contract between the rule table, the host and the kernels: each Args of the table is
its C struct (fields, order, types, byte layout), each rule's host scalars fill exactly
those fields, the C kernel list is the table's, and the shared constants agree."""

import re
import shutil
import subprocess

import numpy as np
import pytest
from cases import kernel_hyper

from fastopt import _rules
from fastopt._backends import _cupy, _layout
from fastopt._cpu import _optim

KERNELS_DIR = _cupy.kernel_dir()
HEADER = (KERNELS_DIR / "include" / "fastopt" / "optim.h").read_text()
ARGS = sorted({k.args for k in _rules.ALL_KERNELS.values()}, key=lambda a: a.name)

def struct_fields(name):
    """[(C type, field name)] of fo_<name>_args in optim.h."""
    structs = dict((n, body) for body, n in
                   re.findall(r"typedef struct \{([^}]*)\} fo_(\w+)_args_##SFX;", HEADER))
    body = re.sub(r"/\*.*?\*/", "", structs[name]).replace("\\", "")
    fields = []
    for decl in body.split(";"):
        decl = decl.strip()
        if decl:
            kind, names = decl.split(None, 1)
            fields += [(kind, n.strip()) for n in names.split(",")]
    return fields


@pytest.mark.parametrize("args", ARGS, ids=[a.name for a in ARGS])
def test_table_args_are_the_c_structs(args):
    fields = struct_fields(args.name)
    assert [name for _, name in fields] == list(args.fields)
    assert [kind for kind, _ in fields] == ["T"] * len(args.reals) + ["int"] * len(args.flags)


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")
def test_record_layout_is_the_c_layout(tmp_path):
    """Every field's byte offset and every struct's size, compiled by the C compiler, equal
    those of the NumPy record the backends pack."""
    lines = []
    for args in ARGS:
        for sfx in ("f32", "f64"):
            struct = f"fo_{args.name}_args_{sfx}"
            lines.append(f'printf("{struct} sizeof %zu\\n", sizeof({struct}));')
            lines += [f'printf("{struct} {f} %zu\\n", offsetof({struct}, {f}));'
                      for f in args.fields]
    source = tmp_path / "layout.c"
    source.write_text("#include <stddef.h>\n#include <stdio.h>\n#include \"fastopt/optim.h\"\n"
                      "int main(void) {\n" + "\n".join(lines) + "\nreturn 0;\n}\n")
    exe = tmp_path / "layout"
    subprocess.run(["cc", "-std=c99", f"-I{KERNELS_DIR / 'include'}", str(source), "-o",
                    str(exe), "-lm"], check=True)
    out = dict(line.rsplit(" ", 1) for line in
               subprocess.run([str(exe)], check=True, capture_output=True,
                              text=True).stdout.splitlines())
    for args in ARGS:
        for sfx, dtype in (("f32", np.float32), ("f64", np.float64)):
            record = args.record(dtype, {f: 0 for f in args.fields})
            struct = f"fo_{args.name}_args_{sfx}"
            assert int(out[f"{struct} sizeof"]) == record.dtype.itemsize, struct
            for f in args.fields:
                assert int(out[f"{struct} {f}"]) == record.dtype.fields[f][1], (struct, f)


@pytest.mark.parametrize("rule", _rules.RULES, ids=[r.name for r in _rules.RULES])
def test_host_scalars_fill_the_struct(rule):
    """Each rule's scalars function gives exactly its kernels' fields (for multi-pass rules,
    the update pass's and fo_scaled_apply's), reals as floats and flags as bools."""
    scalars = rule.scalars(np.float32, **kernel_hyper(rule.kernels[0].name, 3, rule))
    passes = scalars if rule.driver else (scalars,)
    kernels = [k for k in rule.kernels if k.name != "adafactor_factored"] if rule.driver \
        else rule.kernels[:1]
    for fields, kernel in zip(passes, kernels):
        args = kernel.args
        assert set(fields) == set(args.fields)
        for name in args.reals:
            assert isinstance(fields[name], float), name
        for name in args.flags:
            assert isinstance(fields[name], bool), name
        record = args.record(np.float64, fields)
        assert record.dtype.names == args.fields


def test_every_rule_shares_the_gradient_prologue():
    utility = {kernel.args.name for kernel, _ in _rules.UTILITY_OPS.values()}
    for args in ARGS:
        if args.name != "scaled_apply" and args.name not in utility:
            assert args.fields[:2] == ("clip", "gscale"), args.name


def test_c_kernel_list_is_the_table():
    """FO_ELEMENTWISE_KERNELS in optim.h lists exactly the table's elementwise kernels
    (the cautious count kernels through FO_CAUTION_COUNTS), each with its Args and number
    of state operands, FO_CAUTIOUS_KERNELS its cautious steps (their per-tensor factor not
    counted); the Cython module has a chunk function for each kernel of the table (and the
    passes')."""
    elementwise, cautious = HEADER[HEADER.index("#define FO_ELEMENTWISE_KERNELS"):].split(
        "#define FO_CAUTIOUS_KERNELS")
    cautious, counts = cautious.split("#define FO_CAUTION_COUNTS")

    def listed(body):
        return {name: (args, int(n))
                for name, args, n in re.findall(r"X\(T, SFX, (\w+), (\w+), (\d)\)", body)}
    assert "FO_CAUTION_COUNTS(X, T, SFX)" in elementwise  # the count kernels are elementwise
    assert {**listed(elementwise), **listed(counts)} == {
        name: (k.args.name, len(k.state)) for name, k in _rules.KERNELS.items()}
    assert listed(cautious) == {
        name: (k.args.name, len(k.state) - k.aux)
        for name, k in _rules.CAUTIOUS_KERNELS.items()}
    assert listed(counts) == {  # the count kernels, which the CPU loops also sum in the pass
        c.count.name: (c.count.args.name, len(c.count.state))
        for rule in _rules.RULES for c in rule.cautious}
    assert _optim.kernels() == {name: len(k.state) for name, k in _rules.ALL_KERNELS.items()}


def test_table_rows_are_consistent():
    names = [rule.name for rule in _rules.RULES]
    assert len(set(names)) == len(names)
    for rule in _rules.RULES:
        assert rule.op.endswith("_step")
        for kernel in rule.kernels:
            if kernel not in _rules.PASS_KERNELS and rule.driver is None:
                assert set(kernel.state) <= set(rule.state), (rule.name, kernel.name)
        # rules sharing a registry operation share their kernels
        assert _rules.BY_OP[rule.op].kernels == rule.kernels
        assert _rules.BY_OP[rule.op].cautious == rule.cautious
        for caution in rule.cautious:  # the variant of a kernel of the rule, its state first
            base = next(k for k in rule.kernels if k.name == caution.base)
            assert caution.step.state == base.state + (_rules.CAUTION,)
            assert set(caution.count.state) <= set(base.state)


@pytest.mark.parametrize("name", sorted(_layout.C_NAMES))
def test_layout_constants_match_the_sources(name):
    path, c_name = _layout.C_NAMES[name]
    text = (KERNELS_DIR / path).read_text()
    found = re.findall(rf"^\s*(?:#define|DEF)\s+{c_name}\s*=?\s*(\d+)", text, re.M)
    assert found == [str(getattr(_layout, name))]


def test_pack_pads_to_eight_bytes():
    args = _rules.Args("demo", ("a", "b", "c"), ("flag",))
    record = args.record(np.float32, {"a": 1.5, "b": -2.0, "c": 0.25, "flag": True})
    buf = _rules.pack(record)
    assert record.dtype.itemsize == 16 and buf.size == 16
    assert buf[:12].view(np.float32).tolist() == [1.5, -2.0, 0.25]
    assert buf[12:16].view(np.int32).tolist() == [1]
    odd = _rules.Args("odd", ("a",)).record(np.float32, {"a": 3.0})
    assert _rules.pack(odd).size == 8 and _rules.pack(odd)[:4].view(np.float32)[0] == 3.0
    with pytest.raises(ValueError, match="expected the fields"):
        args.record(np.float32, {"a": 1.0})

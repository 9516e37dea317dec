"""eqns(jaxpr): every equation of a jaxpr and of the jaxprs nested in its equations' params
(jit, scan, while, custom_jvp, ...), for tests that check what a traced step is made of."""


def _inner_jaxprs(e):
    """The jaxprs in an equation's params (jit, scan, while, cond branches, kernel bodies)."""
    for v in e.params.values():
        for sub in v if isinstance(v, (tuple, list)) else (v,):
            inner = getattr(sub, "jaxpr", sub)  # (a ClosedJaxpr holds its jaxpr)
            if hasattr(inner, "eqns"):
                yield inner


def eqns(jaxpr, into_kernels=True):
    """into_kernels=False: not into pallas_call bodies (a kernel's pl.when is a cond too)."""
    for e in jaxpr.eqns:
        yield e
        if not into_kernels and e.primitive.name == "pallas_call":
            continue
        for inner in _inner_jaxprs(e):
            yield from eqns(inner, into_kernels)


def kernel_name(e) -> str:
    """A pallas_call equation's kernel name ("" for any other equation)."""
    if e.primitive.name != "pallas_call":
        return ""
    info = e.params.get("name_and_src_info")
    return str(getattr(info, "name", None) or e.params.get("name") or "")


def pallas_calls(jaxpr, prefix=""):
    """The pallas_call equations (nested too) whose kernel name starts with ``prefix``: on a
    GPU a step also launches the cache-write kernels, so a test names the one it means."""
    return [e for e in eqns(jaxpr) if e.primitive.name == "pallas_call" and kernel_name(e).startswith(prefix)]


def kernel_bodies(jaxpr):
    """The bodies of the Pallas kernels a jaxpr launches (pallas_call's, and Mosaic GPU's
    plgpu.kernel's: an mpmd_map with one jaxpr a mesh)."""
    out = []
    for e in eqns(jaxpr):
        if e.primitive.name == "pallas_call":
            out.append(e.params["jaxpr"])
        elif e.primitive.name == "mpmd_map":
            out += list(e.params["jaxprs"])
    return out


def dead_arrays(jaxpr):
    """The equations of a jaxpr (and of the jaxprs nested in it) that have no effects and whose
    outputs are all arrays no later equation and no output reads. In a Mosaic GPU kernel body
    such a value has a layout nothing constrains: jax 0.11.2's layout inference backtracks over
    every other unknown layout before it gives up on it (a lowering that never ends)."""
    def is_var(v):
        return not hasattr(v, "val")  # (Literals carry val)

    used = {v for e in jaxpr.eqns for v in e.invars if is_var(v)} | {v for v in jaxpr.outvars if is_var(v)}
    out = [e for e in jaxpr.eqns if not e.effects and e.outvars
           and all(getattr(v.aval, "ndim", 0) > 0 and v not in used for v in e.outvars)]
    for e in jaxpr.eqns:
        for inner in _inner_jaxprs(e):
            out += dead_arrays(inner)
    return out

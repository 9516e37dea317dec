"""eqns(jaxpr): every equation of a jaxpr and of the jaxprs nested in its equations' params
(jit, scan, while, custom_jvp, ...), for tests that check what a traced step is made of."""


def eqns(jaxpr, into_kernels=True):
    """into_kernels=False: not into pallas_call bodies (a kernel's pl.when is a cond too)."""
    for e in jaxpr.eqns:
        yield e
        if not into_kernels and e.primitive.name == "pallas_call":
            continue
        for v in e.params.values():
            for sub in v if isinstance(v, (tuple, list)) else (v,):
                if hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):  # ClosedJaxpr
                    yield from eqns(sub.jaxpr, into_kernels)
                elif hasattr(sub, "eqns"):
                    yield from eqns(sub, into_kernels)


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

"""eqns(jaxpr): every equation of a jaxpr and of the jaxprs nested in its equations' params
(jit, scan, while, custom_jvp, ...), for tests that check what a traced step is made of."""


def eqns(jaxpr):
    for e in jaxpr.eqns:
        yield e
        for v in e.params.values():
            for sub in v if isinstance(v, (tuple, list)) else (v,):
                if hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):  # ClosedJaxpr
                    yield from eqns(sub.jaxpr)
                elif hasattr(sub, "eqns"):
                    yield from eqns(sub)

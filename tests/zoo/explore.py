"""Not a test: run every zoo case once and print its outcome, to rebuild the EXPECTED tables.

    python -m tests.zoo.explore test_hf_encoders test_hf_decoders test_hf_seq2seq_speech test_peft test_torch_modules
"""
import importlib, sys, time
from .harness import B, T_EQ, T_NE, compare, TOL

for modname in sys.argv[1:]:
    mod = importlib.import_module(f"tests.zoo.{modname}")
    for name, case in mod.CASES.items():
        for t in (T_EQ, T_NE):
            for b in (1, 2, B):
                t0 = time.time()
                try:
                    errs = compare(case, B=B, T=t, b=b)
                    worst = max(errs, key=errs.get)
                    status = "pass" if errs[worst] < TOL else f"WRONG {errs[worst]:.2e} at {worst}"
                except Exception as e:
                    status = f"RAISES {type(e).__name__}: {str(e)[:300]}"
                print(f"{name:20s} b={b} T={t} {'T==B' if t == B else 'T!=B'} {time.time()-t0:5.2f}s {status}", flush=True)

"""The two concrete studies run by ``benchmarks/reproduce_codiemb.py`` and ``benchmarks/fusion_study.py`` (not part
of the installed package).

They read the options of those scripts' parsers and build on the library's generic layer,
:mod:`codiemb_st.experiments` (resumable runs, the result store, held-out dev sets, seed pairing).
``python benchmarks/<script>.py`` puts ``benchmarks/`` first on ``sys.path``, so the scripts import these modules as
``from studies.reproduction import ...``; the tests do the same (``benchmarks`` is on pytest's ``pythonpath``).

- :mod:`studies.reproduction` / :mod:`studies.reproduction_study`: the CoDiEmb reproduction (tracks, run kinds,
  budgets; the track's runs, soups, evaluations, claims and report).
- :mod:`studies.fusion` / :mod:`studies.fusion_study`: the merge-rule study (ingredient runs, checkpoint sets, the
  merge grid; the merge loop, dev picks, seed pairing and report).
"""

"""Experiment configs: each module's `get_config()` returns a ConfigDict (configs/default.py
comments every field).  A variant imports the config it derives from and changes a few fields:

  from configs import default

  def get_config():
    config = default.get_config()
    config.model.loops = 10
    return config

Pass a file with --config=configs/<name>.py and override any field on the command line
(--config.model.loops=20).  The package is installed with loopicl (pyproject.toml), so the
import works from any directory.
"""

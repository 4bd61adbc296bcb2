"""embedkit: music genre classification of 30 s clips.

Pipeline (one module per stage, data flows one way):
audio -> segments -> backbones -> extract/store -> heads | cnn -> evaluate (runs) -> report.
"""

__version__ = "0.1.0"

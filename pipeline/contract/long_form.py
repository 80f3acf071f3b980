"""MusicGen's window and the stride of windowed continuation (long-form generation).

Written once here: the settings' defaults (``model.max_duration``, ``generation.window_stride``),
the worker's fallbacks (workers/runtime) and the rules' advice all read them. Plain numbers, so
the producer imports them without torch.
"""

#: What MusicGen was trained on: a 1500-token window at 50 Hz, in seconds.
MODEL_WINDOW_S = 30.0
#: audiocraft's default extend_stride: each next window starts 18 s on, prompted with the last 12 s.
WINDOW_STRIDE_S = 18.0

#!/usr/bin/python3
"""Reads ValenceMeta from buffers with PyGObject (Debian's /usr/bin/python3 + python3-gst-1.0),
the way README.md shows it. Driven by tests/element.rs (`python_reads_valence_meta`).

Usage: read_meta.py MODEL_DIR   (GST_PLUGIN_PATH must reach libgstvalence.so)
Prints one line per buffer that carries the meta: "<pts ns> <label> <confidence>".
"""
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstApp", "1.0")
from gi.repository import Gst, GstApp  # noqa: E402,F401  (GstApp registers appsink's API)

Gst.init(None)
model = sys.argv[1]
pipeline = Gst.parse_launch(
    "audiotestsrc num-buffers=100 samplesperbuffer=4800 wave=pink-noise ! "
    "audio/x-raw,rate=48000,channels=1 ! "
    f'valenceclassify model="{model}" window=1000000000 hop=1000000000 ! audioconvert ! '
    "appsink name=sink sync=false"
)
sink = pipeline.get_by_name("sink")
pipeline.set_state(Gst.State.PLAYING)
found = 0
while True:
    sample = sink.pull_sample()
    if sample is None:
        break
    buf = sample.get_buffer()
    meta = buf.get_custom_meta("ValenceMeta")
    if meta is None:
        continue
    s = meta.get_structure()
    print(buf.pts, s.get_string("label"), s.get_value("confidence"))
    found += 1
pipeline.set_state(Gst.State.NULL)
sys.exit(0 if found else 1)

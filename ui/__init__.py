"""The Gradio app, installed as `dit_accel.ui` (issue #7)."""

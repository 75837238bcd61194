"""The Gradio app, installed as `dit_accel.ui` (arrives with the UI issue)."""

"""The benchmark: otp-service against references measured in the same run (``python -m bench``).

See bench/README.md for what it measures, how, and what the profile showed.
"""

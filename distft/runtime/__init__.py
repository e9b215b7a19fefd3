"""A rank's runtime: process groups and collectives (dist), the pre-flight report and hang
watchdog (preflight), and agreed stops on signals (stop). Imports nothing above distft.config."""

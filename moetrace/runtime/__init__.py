"""moetrace.runtime"""

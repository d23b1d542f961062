"""zaya_lib.ttc"""

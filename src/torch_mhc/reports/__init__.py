"""What runs after training: `mhc compare` (the protocol, summary.json, report.md), `mhc diagnose`
and the plots. Above train/: it may import train/ and diagnostics/, never the other way round."""

"""Output for people: the HTML report (`html`, `gp.write_report`) and the
matplotlib figures (`plot`, exported as `gp.plot`)."""

"""The gather stage, fenced off: where candidates come from (`sources`), fetching them over a hostile
network (`download`), the images folder and its manifest (`store`), the run itself (`run`) and what it
reports (`report`). Only `download.HttpClient` is shared with another stage (predict fetches URLs too).
"""
